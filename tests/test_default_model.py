import re
import shutil

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from eemllm_models import ModelLoadError, default_model_path, generate_answers, load_model, load_shapes_vqa, zoo
from eemllm_models.generation import build_prompt
from eemllm_models.zoo import shapes_vqa

ANSWERS = {
    "color_at": set(shapes_vqa.COLORS),
    "shape_at": set(shapes_vqa.SHAPES),
    "count": {str(k) for k in range(shapes_vqa.MIN_SHAPES, shapes_vqa.MAX_SHAPES + 1)},
    "relation": {"left", "right", "above", "below"},
    "exists": {"yes", "no"},
    "read": set(shapes_vqa.CHARACTERS),
    "mc": set("ABCD"),
}


def _model_card_accuracy() -> dict[str, float]:
    card = (default_model_path() / "README.md").read_text()
    rows = re.findall(r"^\| `?(\w+)`? \| ([\d.]+)% \|", card, flags=re.M)
    return {name: float(value) / 100 for name, value in rows}


def test_shipped_files_are_safetensors_within_size_limit():
    path = default_model_path()
    weights = path / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 25 * 10**6
    assert (path / "tokenizer.json").is_file() and (path / "README.md").is_file()
    assert not list(path.glob("*.bin"))


def test_loads_offline_with_the_auto_classes():
    path = default_model_path()
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    assert isinstance(processor, LlavaProcessor)
    assert model.config.text_config.num_hidden_layers >= 12
    batch = processor(images=list(load_shapes_vqa("test", n=1)["image"]), text=[build_prompt(processor, "Hi?")],
                      return_tensors="pt")
    assert (batch["input_ids"] == model.config.image_token_id).sum() >= 100


def test_chat_template_is_llava_1_5s(default_model):
    _, processor = default_model
    prompt = build_prompt(processor, "What shape is at the center?")
    assert prompt == "USER: <image>\nWhat shape is at the center? ASSISTANT:"


def test_generate_answers_each_type_in_its_format(default_model):
    model, processor = default_model
    data = load_shapes_vqa("test", n=21)
    answers = generate_answers(model, processor, data["image"], data["question"], batch_size=7)
    for qtype, answer in zip(data["qtype"], answers):
        assert answer in ANSWERS[qtype], (qtype, answer)


def test_batched_left_padded_generation_matches_one_by_one(default_model):
    model, processor = default_model
    data = load_shapes_vqa("test", n=7)  # prompts of different lengths: the batch is padded
    batched = generate_answers(model, processor, data["image"], data["question"], batch_size=7)
    single = generate_answers(model, processor, data["image"], data["question"], batch_size=1)
    assert batched == single


def test_test_split_accuracy_matches_the_model_card(default_model):
    model, processor = default_model
    card = _model_card_accuracy()
    assert set(card) == {*shapes_vqa.QTYPES, "overall"}
    data = load_shapes_vqa("test", n=280)  # the first 40 rows of each type of the card's test split
    answers = generate_answers(model, processor, data["image"], data["question"], batch_size=40)
    measured = shapes_vqa.accuracy(data["qtype"], answers, data["answer"])
    assert abs(measured["overall"] - card["overall"]) <= 0.05
    for qtype in shapes_vqa.QTYPES:
        assert abs(measured[qtype] - card[qtype]) <= 0.15, qtype


def test_model_card_lists_every_type_near_chance_as_a_limit():
    card_text = (default_model_path() / "README.md").read_text()
    card = _model_card_accuracy()
    weak = [q for q in shapes_vqa.QTYPES if card[q] < shapes_vqa.CHANCE[q] + 0.25]
    if weak:
        limits = card_text.split("## Limits", 1)[-1]
        assert "## Limits" in card_text and all(q in limits for q in weak), weak
    assert sum(card[q] >= shapes_vqa.CHANCE[q] + 0.5 for q in shapes_vqa.QTYPES) >= 4


@pytest.fixture
def model_copy(tmp_path):
    return shutil.copytree(default_model_path(), tmp_path / "model")


def test_missing_weights_file_is_a_clear_error(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is missing; re-save the model"):
        load_model(model_copy)


def test_truncated_weights_file_is_a_clear_error(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is corrupted"):
        load_model(model_copy)


def test_flipped_byte_in_default_weights_is_caught_by_load_default(model_copy, monkeypatch):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "default_model_path", lambda: model_copy)
    with pytest.raises(ModelLoadError, match="does not match its recorded checksum.*reinstall eemllm"):
        zoo.load_default()


def test_unknown_model_name_offline_says_what_to_do():
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load_model("nobody/no-such-model")


def test_load_default_is_eval_mode_fp32(default_model):
    model, _ = default_model
    assert not model.training and model.dtype == torch.float32


def test_a_chat_template_that_writes_bos_gives_one_bos_when_the_tokenizer_adds_it_too():
    """Gemma 3's and Llama 3's templates start with ``{{ bos_token }}`` and their tokenizers add BOS on encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", "<image>", "user", "Hi", "model"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(["<bos>", "<image>"])
    template = ("{{ bos_token }}{% for m in messages %}user {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} model")
    for adds_bos in (True, False):
        if adds_bos:
            core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", unk_token="<unk>",
                                            chat_template=template)
        ids = tokenizer(build_prompt(tokenizer, "Hi")).input_ids
        assert ids == [1, 3, 2, 4, 5], (adds_bos, ids)
