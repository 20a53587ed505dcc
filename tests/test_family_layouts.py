"""Which positions are visual in the InternVL, Idefics3, SmolVLM, Mistral 3 and LLaVA-NeXT-Video families.

Held to the model itself: the TokenLayout marks visual exactly the positions where the model puts an
image or video feature into the language model's input (everywhere else that input is the token's own
embedding), as many as the model's get_image_features / get_video_features make. The marker tokens the
processors lay out around the features (InternVL's <img> </img>, Idefics3's and SmolVLM's
<fake_token_around_image> <row_i_col_j> <global-img> and newlines, Pixtral's [IMG_BREAK] [IMG_END]) are
text, and padding (left or right) is neither.

Idefics3 is also checked on the batch its real processor makes offline (a word-level tokenizer built here
with the tokenizers library, the PIL image processor). Pixtral's processor module imports torchvision,
which this environment lacks, and SmolVLM's processor needs num2words, so those two are checked on the
tiny batches, which lay the markers out as their processors' ``replace_image_token`` does.
"""

import inspect

import numpy as np
import pytest
import torch
from tiny_models import (
    BOS,
    EOS,
    FAKE_AROUND_IMAGE,
    FAMILIES,
    FIRST_WORD,
    GLOBAL_IMAGE,
    IMAGE_TOKEN,
    IMG_BREAK,
    IMG_END,
    MAX_GRID,
    NEWLINE,
    PAD,
    ROW_COL,
    VISION_END,
    VISION_START,
    idefics_image_tokens,
)
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from eemllm_models import token_layout
from eemllm_models.families import family_of

ROW_COLS = tuple(ROW_COL + k for k in range(MAX_GRID * MAX_GRID))
IDEFICS_MARKERS = (FAKE_AROUND_IMAGE, GLOBAL_IMAGE, NEWLINE, *ROW_COLS)
MARKERS = {
    "internvl": (VISION_START, VISION_END),  # <img>, </img>
    "internvl_qwen3": (VISION_START, VISION_END),
    "idefics3": IDEFICS_MARKERS,
    "smolvlm": IDEFICS_MARKERS,
    "mistral3": (IMG_BREAK, IMG_END),
    "llava_next_video": (),
}
"""The text tokens each family's processor lays out around its image features."""
AROUND_RUNS = {
    "internvl": ((VISION_START,), (VISION_END,)),
    "internvl_qwen3": ((VISION_START,), (VISION_END,)),
    "idefics3": ((GLOBAL_IMAGE, *ROW_COLS), (FAKE_AROUND_IMAGE, NEWLINE)),
    "smolvlm": ((GLOBAL_IMAGE, *ROW_COLS), (FAKE_AROUND_IMAGE, NEWLINE)),
    "mistral3": (None, (IMG_BREAK, IMG_END)),
}
"""The tokens right before and right after every run of visual positions (None: any token)."""


def _filled_with_features(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[batch, seq]`` bool: where the language model's input is not the token's own embedding, i.e. where
    the model put an image or video feature."""
    seen = {}
    hook = family_of(model).language_model_of(model).register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
            tokens = model.get_input_embeddings()(batch["input_ids"])
    finally:
        hook.remove()
    return (seen["embeds"] != tokens).any(-1)


def _feature_count(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> int:
    """How many feature vectors the model's own get_image_features and get_video_features make for ``batch``."""
    count = 0
    for method, pixels in (("get_image_features", "pixel_values"), ("get_video_features", "pixel_values_videos")):
        if pixels not in batch:
            continue
        get = getattr(model.model, method)
        names = inspect.signature(get).parameters
        with torch.no_grad():
            features = get(**{k: v for k, v in batch.items() if k in names}).pooler_output
        count += sum(f.numel() for f in features) // model.config.get_text_config().hidden_size
    return count


def _check_layout(family: str, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> None:
    """The layout of ``batch`` marks visual exactly the feature positions; markers and padding are not visual."""
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(layout.valid, batch["attention_mask"].bool())
    assert torch.equal(layout.visual, _filled_with_features(model, batch))
    assert int(layout.n_visual.sum()) == _feature_count(model, batch) > 0
    markers = torch.isin(batch["input_ids"], torch.tensor(MARKERS[family], dtype=torch.long)) & layout.valid
    assert bool(markers.any(-1).all()) == bool(MARKERS[family])  # every row has its markers, where there are any
    assert bool(layout.text[markers].all()) and not bool(layout.visual[markers].any())
    before, after = AROUND_RUNS.get(family, (None, None))
    for row in range(len(batch["input_ids"])):
        ids = batch["input_ids"][row].tolist()
        for start, end in layout.image_spans(row):
            assert before is None or ids[start - 1] in before
            assert after is None or ids[end] in after


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", list(MARKERS))
def test_visual_positions_are_the_feature_positions_and_markers_are_text(family, padding):
    build_model, build_batch = FAMILIES[family]
    model = build_model(seed=0)
    batch = build_batch(model, 3, 2, seed=1, padding=padding)
    assert not bool(batch["attention_mask"].all()) and len(set(batch["attention_mask"].sum(-1).tolist())) > 1
    _check_layout(family, model, batch)


def test_video_positions_are_visual():
    build_model, build_batch = FAMILIES["llava_next_video"]
    model = build_model(seed=0)
    batch = build_batch(model, 3, 1, seed=2)
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    video = batch["input_ids"] == model.config.video_token_id
    assert video.any(-1).tolist() == [True, False, True] and bool(layout.visual[video].all())
    with torch.no_grad():
        frames = model.model.get_video_features(pixel_values_videos=batch["pixel_values_videos"]).pooler_output
    assert int(video.sum()) == frames.shape[0] * frames.shape[1]


def _idefics3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the tiny models' ids: their special and image tokens, the Idefics3 markers
    (each newline its own token) and a few words from ``FIRST_WORD``."""
    words = ["<unk>", "<end_of_utterance>", "User", ":", "what", "is", "in", "the", "picture", "?"]
    specials = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<image>": IMAGE_TOKEN,
                "<fake_token_around_image>": FAKE_AROUND_IMAGE, "<global-img>": GLOBAL_IMAGE,
                **{f"<row_{i + 1}_col_{j + 1}>": ROW_COL + i * MAX_GRID + j
                   for i in range(MAX_GRID) for j in range(MAX_GRID)}}
    vocab = {**{word: FIRST_WORD + k for k, word in enumerate(words)}, **specials, "\n": NEWLINE}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("padding", ["left", "right"])
def test_idefics3_processor_batch_has_the_tiny_batches_layout(padding):
    """The real Idefics3 processor splits images of three shapes into sub-images; its token layout is the one
    the tiny batches use, and on it too the visual positions are exactly the image-feature positions."""
    model = FAMILIES["idefics3"][0](seed=0)
    tokenizer = _idefics3_tokenizer()
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=model.model.image_seq_len)
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (64, 40, 3), dtype=np.uint8), rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)],
              [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]]
    texts = [["User:", "what is", "in the picture?"], ["User: what", "?"]]
    batch = processor(images=images, text=["<image>".join(parts) for parts in texts], return_tensors="pt",
                      padding=True, padding_side=padding)
    grids = image_processor(images=images, return_row_col_info=True)
    for row, (parts, rows, cols) in enumerate(zip(texts, grids["rows"], grids["cols"])):
        expected = tokenizer(parts[0], add_special_tokens=False).input_ids
        for part, grid in zip(parts[1:], zip(rows, cols)):
            expected += idefics_image_tokens(*grid, model.model.image_seq_len)
            expected += tokenizer(part, add_special_tokens=False).input_ids
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == expected
    assert (2, 2) in set(zip(grids["rows"][0], grids["cols"][0]))  # several rows and columns of sub-images
    _check_layout("idefics3", model, dict(batch))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_qwen3_vl_images_and_videos_in_one_prompt(padding):
    """Qwen3-VL with an image and a video per prompt: image and video positions are visual, as many as the
    model's features; the modes' fast paths equal their references, and cached generation equals
    recomputing under a plan."""
    from eemllm_models import EfficiencyPlan
    from tiny_models import VIDEO_TOKEN, qwen3_vl_video_batch

    model = FAMILIES["qwen3_vl"][0](seed=0)
    batch = qwen3_vl_video_batch(model, 3, seed=1, padding=padding)
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    video = batch["input_ids"] == VIDEO_TOKEN
    assert bool(video.any(-1).all()) and bool(layout.visual[video].all())
    assert torch.equal(layout.visual, _filled_with_features(model, batch))
    assert int(layout.n_visual.sum()) == _feature_count(model, batch)
    valid = batch["attention_mask"].bool()
    for mode in ("frozen", "naavit", "composite"):
        plan = EfficiencyPlan.from_layers(4, {0: mode, 2: mode, 3: "frozen"})
        with torch.no_grad():
            with plan.applied(model, "reference"):
                reference = model(**batch).logits
            with plan.applied(model):
                fast = model(**batch).logits
        torch.testing.assert_close(fast[valid], reference[valid], rtol=1e-5, atol=1e-5)
    words = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": list(range(FIRST_WORD))}
    with torch.no_grad(), EfficiencyPlan.from_layers(4, {1: "frozen", 2: "naavit"}).applied(model):
        cached = model.generate(**batch, **words, use_cache=True)
        recomputed = model.generate(**batch, **words, use_cache=False)
    assert torch.equal(cached, recomputed)
