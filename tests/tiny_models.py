"""Tiny random multimodal models of each supported family, built from transformers configs.

Nothing is downloaded. ``FAMILIES[name] = (build_model(seed, attn), build_batch(model, batch, images,
seed, padding))``: prompts ``[text][image]...[text]`` of different lengths, padded left or right,
with pixel inputs whose features match the image tokens.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 3, 4, 5, 6
FIRST_WORD = 7
VOCAB = 64
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8)
PINPOINTS = [[32, 32], [32, 64], [64, 32]]
QWEN_GRID = (1, 4, 4)  # 16 px images, 4 px patches, merged 2x2 into 4 visual tokens
MARKER_VOCAB = 80
"""Vocabulary of the families whose processors lay image marker tokens out: ids ``VOCAB..`` are those
markers, so no random word (drawn from ``FIRST_WORD..VOCAB``) is one."""
IMG_BREAK, IMG_END = 64, 65  # Pixtral (Mistral3): after each row of image tokens; after the last row instead
# Idefics3 / SmolVLM: <fake_token_around_image>, <global-img>, "\n", <row_i_col_j> = ROW_COL + (i - 1) * MAX_GRID + j - 1
FAKE_AROUND_IMAGE, GLOBAL_IMAGE, NEWLINE, ROW_COL, MAX_GRID = 66, 67, 68, 69, 3
IDEFICS_GRIDS = ((1, 2), (2, 2), (2, 1))  # rows x cols of sub-images per image, in turn
PIXTRAL_SIZES = ((48, 32), (32, 64), (32, 32))  # image heights x widths in turn: one token per 16 px square


def _finish(model: PreTrainedModel, attn: str) -> PreTrainedModel:
    model.eval()
    model.set_attn_implementation(attn)
    return model


def tiny_llava(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """LLaVA-1.5 style: CLIP tower, GELU projector, Llama decoder (with GQA), 16 visual tokens per image."""
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT),
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=16)
    return _finish(LlavaForConditionalGeneration(config), attn)


def tiny_llava_next(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """LLaVA-NeXT: anyres tiles and image-newline features at image-token positions."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT),
                             image_grid_pinpoints=PINPOINTS, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
    return _finish(LlavaNextForConditionalGeneration(config), attn)


def tiny_llava_onevision(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """LLaVA-OneVision: anyres images, Qwen2 decoder."""
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=Qwen2Config(**TEXT),
                                  image_grid_pinpoints=PINPOINTS, image_token_id=IMAGE_TOKEN,
                                  video_token_id=VIDEO_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="default")
    return _finish(LlavaOnevisionForConditionalGeneration(config), attn)


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa", version: str = "2") -> PreTrainedModel:
    """Qwen2-VL (or Qwen2.5-VL with ``version="2.5"``): GQA decoder with M-RoPE."""
    torch.manual_seed(seed)
    text = {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    common = dict(depth=1, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision = dict(common, embed_dim=32, hidden_size=64, in_chans=3, mlp_ratio=2)
        return _finish(Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids)),
                       attn)
    vision = dict(common, depth=2, hidden_size=32, intermediate_size=64, in_channels=3, out_hidden_size=64,
                  window_size=8, fullatt_block_indexes=[1])
    return _finish(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                        **ids)), attn)


def tiny_qwen3_vl(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """Qwen3-VL: the qwen3 decoder style (q/k norms), interleaved M-RoPE, deepstack features after layers 0, 1."""
    torch.manual_seed(seed)
    text = {**TEXT, "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END)
    return _finish(Qwen3VLForConditionalGeneration(config), attn)


def tiny_gemma3(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """Gemma 3: the gemma3 decoder style (q/k norms, sandwich norms, query_pre_attn_scalar), sliding-window
    layers (window 8, shorter than the prompts) beside global ones, a SigLIP tower pooled to 4 tokens per
    image, bidirectional attention inside an image. Norm weights are random, so a swapped norm shows, and so is
    the projector (Gemma 3 initialises it to zeros, which would make every image the same)."""
    torch.manual_seed(seed)
    text = Gemma3TextConfig(**{**TEXT, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"] * 2})
    vision = SiglipVisionConfig(**{**CLIP, "image_size": 16, "patch_size": 4})
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START, eoi_token_index=VISION_END)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and "language_model" in name:
                parameter.normal_(0.0, 0.5)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return _finish(model, attn)


def tiny_internvl(seed: int = 0, attn: str = "sdpa", decoder: str = "qwen2") -> PreTrainedModel:
    """InternVL: InternViT tower (a 32 px tile is 16 patches, pixel-shuffled into 4 tokens), MLP projector,
    Qwen2 decoder, or Qwen3's (the qwen3 style: q/k norms) with ``decoder="qwen3"``."""
    torch.manual_seed(seed)
    text = Qwen2Config(**TEXT) if decoder == "qwen2" else Qwen3Config(**TEXT, head_dim=16)
    config = InternVLConfig(vision_config=CLIP, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=4)
    return _finish(InternVLForConditionalGeneration(config), attn)


def tiny_mistral3(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """Mistral 3: Pixtral tower (8 px patches, 2D rotary, images of any size up to 64 px), patch merger
    (2 x 2 patches into one token), Mistral decoder."""
    torch.manual_seed(seed)
    vision = {**CLIP, "model_type": "pixtral", "image_size": 64, "head_dim": 16}
    text = MistralConfig(**{**TEXT, "vocab_size": MARKER_VOCAB}, head_dim=16, sliding_window=None)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                            spatial_merge_size=2)
    return _finish(Mistral3ForConditionalGeneration(config), attn)


def tiny_llava_next_video(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """LLaVA-NeXT-Video: anyres images as LLaVA-NeXT, and videos whose frames are pooled 2 x 2 into 4 tokens."""
    torch.manual_seed(seed)
    config = LlavaNextVideoConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT),
                                  image_grid_pinpoints=PINPOINTS, image_token_index=IMAGE_TOKEN,
                                  video_token_index=VIDEO_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="default")
    return _finish(LlavaNextVideoForConditionalGeneration(config), attn)


def _tiny_idefics(config_class, model_class, seed: int, attn: str) -> PreTrainedModel:
    """Idefics3 / SmolVLM: SigLIP-style tower (a 32 px sub-image is 16 patches, pixel-shuffled into 4 tokens),
    Llama decoder at ``model.model.text_model``. The connector's random weights are scaled by 0.1, so image
    features are about as large as token embeddings (at the default init they are ~13x larger and the layers
    barely change the visual rows: visual LC ~1e-6)."""
    torch.manual_seed(seed)
    config = config_class(vision_config=CLIP, text_config=LlamaConfig(**{**TEXT, "vocab_size": MARKER_VOCAB}),
                          image_token_id=IMAGE_TOKEN, scale_factor=2, pad_token_id=PAD)
    model = model_class(config)
    with torch.no_grad():
        model.model.connector.modality_projection.proj.weight.mul_(0.1)
    return _finish(model, attn)


def tiny_idefics3(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    return _tiny_idefics(Idefics3Config, Idefics3ForConditionalGeneration, seed, attn)


def tiny_smolvlm(seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    return _tiny_idefics(SmolVLMConfig, SmolVLMForConditionalGeneration, seed, attn)


def _assemble(counts: list[list[int]], seed: int, padding: str, markers: tuple[list[int], list[int]] = ([], [])):
    """Token ids with ``counts[b][i]`` image tokens (between ``markers``) for image ``i`` of row ``b``, and the
    padding mask."""
    return _assemble_blocks([[markers[0] + [IMAGE_TOKEN] * n + markers[1] for n in row] for row in counts], seed,
                            padding)


def _assemble_blocks(blocks: list[list[list[int]]], seed: int, padding: str) -> dict[str, torch.Tensor]:
    """Rows ``BOS [words] blocks[b][0] [words] blocks[b][1] ... [words]`` (1-4 random words before each block,
    ``3 + 2 b`` after the last), padded ``"left"`` or ``"right"``: ``input_ids`` and ``attention_mask``
    ``[batch, longest row]``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, row_blocks in enumerate(blocks):
        ids = [BOS]
        for block in row_blocks:
            ids += torch.randint(FIRST_WORD, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),),
                                 generator=g).tolist()
            ids += block
        ids += torch.randint(FIRST_WORD, VOCAB, (3 + 2 * b,), generator=g).tolist()
        rows.append(ids)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, ids in enumerate(rows):
        span = slice(width - len(ids), width) if padding == "left" else slice(0, len(ids))
        input_ids[b, span], mask[b, span] = torch.tensor(ids), 1
    return {"input_ids": input_ids, "attention_mask": mask}


def llava_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    inputs = _assemble([[16] * images] * batch, seed, padding)
    return {**inputs, "pixel_values": torch.randn(batch * images, 3, 32, 32, generator=g)}


def _anyres_images(model, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` anyres images of alternating aspect ratios: ``pixel_values`` ``[n, 3 tiles, 3, 32, 32]``,
    ``image_sizes`` ``[n, 2]`` and each image's token count, from the model's own features."""
    sizes = torch.tensor([[32, 64], [64, 32]] * n)[:n]
    pixel_values = torch.randn(n, 3, 3, 32, 32, generator=g)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
    return pixel_values, sizes, [len(f) for f in features]


def anyres_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """LLaVA-NeXT / OneVision: images of alternating aspect ratios; token counts from the model's own features."""
    g = torch.Generator().manual_seed(seed + 1000)
    pixel_values, sizes, counts = _anyres_images(model, batch * images, g)
    inputs = _assemble([counts[b * images:(b + 1) * images] for b in range(batch)], seed, padding)
    return {**inputs, "pixel_values": pixel_values, "image_sizes": sizes}


def qwen_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    t, h, w = QWEN_GRID
    inputs = _assemble([[t * h * w // 4] * images] * batch, seed, padding, ([VISION_START], [VISION_END]))
    n = batch * images
    return {**inputs, "mm_token_type_ids": (inputs["input_ids"] == IMAGE_TOKEN).long(),
            "pixel_values": torch.randn(n * t * h * w, 3 * 2 * 4 * 4, generator=g),
            "image_grid_thw": torch.tensor([QWEN_GRID] * n)}


def gemma3_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """Gemma 3: 4 image tokens per image between its begin/end-of-image text tokens, and the processor's
    ``token_type_ids`` (1 at image tokens: the model attends bidirectionally inside each image)."""
    g = torch.Generator().manual_seed(seed + 1000)
    inputs = _assemble([[4] * images] * batch, seed, padding, ([VISION_START], [VISION_END]))
    return {**inputs, "token_type_ids": (inputs["input_ids"] == IMAGE_TOKEN).long(),
            "pixel_values": torch.randn(batch * images, 3, 16, 16, generator=g)}


def internvl_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """InternVL: image ``i`` of row ``b`` is ``1 + (b + i) % 3`` tiles of 32 px (the processor's crops and
    thumbnail), laid out as the processor does: ``<img> <IMG_CONTEXT> x (tokens per tile x tiles) </img>``;
    ``pixel_values`` ``[tiles, 3, 32, 32]``; the tokens per tile from the model's own features."""
    g = torch.Generator().manual_seed(seed + 1000)
    tiles = [[1 + (b + i) % 3 for i in range(images)] for b in range(batch)]
    pixel_values = torch.randn(sum(map(sum, tiles)), 3, 32, 32, generator=g)
    with torch.no_grad():
        per_tile = model.model.get_image_features(pixel_values=pixel_values[:1]).pooler_output.shape[1]
    inputs = _assemble([[per_tile * n for n in row] for row in tiles], seed, padding, ([VISION_START], [VISION_END]))
    return {**inputs, "pixel_values": pixel_values}


def mistral3_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """Mistral 3: images of the sizes ``PIXTRAL_SIZES`` in turn, laid out as the Pixtral processor does: each row
    of ``[IMG]`` tokens followed by ``[IMG_BREAK]``, the last row by ``[IMG_END]`` instead; ``pixel_values``
    ``[images, 3, tallest, widest]`` zero-padded past each image and ``image_sizes`` ``[images, 2]``; the token
    count of each image from the model's own features, its row width from its size."""
    g = torch.Generator().manual_seed(seed + 1000)
    sizes = torch.tensor([PIXTRAL_SIZES[k % len(PIXTRAL_SIZES)] for k in range(batch * images)])
    pixel_values = torch.zeros(batch * images, 3, *sizes.max(0).values.tolist())
    for k, (height, width) in enumerate(sizes.tolist()):
        pixel_values[k, :, :height, :width] = torch.randn(3, height, width, generator=g)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
    token_size = model.config.vision_config.patch_size * model.config.spatial_merge_size
    blocks = []
    for (_, width), image in zip(sizes.tolist(), features):
        cols = width // token_size
        tokens = ([IMAGE_TOKEN] * cols + [IMG_BREAK]) * (len(image) // cols)
        blocks.append(tokens[:-1] + [IMG_END])
    inputs = _assemble_blocks([blocks[b * images:(b + 1) * images] for b in range(batch)], seed, padding)
    return {**inputs, "pixel_values": pixel_values, "image_sizes": sizes}


def video_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """LLaVA-NeXT-Video: the anyres images of :func:`anyres_batch`, then in every other row (0, 2, ...) a
    2-frame video: ``pixel_values_videos`` ``[videos, 2 frames, 3, 32, 32]``, its ``<video>`` token count from
    the model's own (pooled) video features."""
    g = torch.Generator().manual_seed(seed + 1000)
    pixel_values, sizes, counts = _anyres_images(model, batch * images, g)
    videos = torch.randn((batch + 1) // 2, 2, 3, 32, 32, generator=g)
    with torch.no_grad():
        per_video = model.model.get_video_features(pixel_values_videos=videos).pooler_output.shape[1]
    blocks = [[[IMAGE_TOKEN] * n for n in counts[b * images:(b + 1) * images]]
              + ([[VIDEO_TOKEN] * per_video] if b % 2 == 0 else []) for b in range(batch)]
    return {**_assemble_blocks(blocks, seed, padding), "pixel_values": pixel_values, "image_sizes": sizes,
            "pixel_values_videos": videos}


def idefics_image_tokens(rows: int, cols: int, per_subimage: int) -> list[int]:
    """One image split into ``rows`` x ``cols`` sub-images and the global image, as the Idefics3 and SmolVLM
    processors lay it out: ``<fake><row_1_col_1><image>*n<fake><row_1_col_2><image>*n\\n ... \\n`` per row,
    then ``\\n<fake><global-img><image>*n<fake>``."""
    ids = []
    for i in range(rows):
        for j in range(cols):
            ids += [FAKE_AROUND_IMAGE, ROW_COL + i * MAX_GRID + j] + [IMAGE_TOKEN] * per_subimage
        ids.append(NEWLINE)
    return ids + [NEWLINE, FAKE_AROUND_IMAGE, GLOBAL_IMAGE] + [IMAGE_TOKEN] * per_subimage + [FAKE_AROUND_IMAGE]


def idefics_batch(model, batch: int, images: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """Idefics3 / SmolVLM: image ``i`` of row ``b`` split into ``IDEFICS_GRIDS[(b + i) % 3]`` sub-images plus
    the global image (:func:`idefics_image_tokens`); ``pixel_values`` ``[batch, most sub-images in a row, 3, 32,
    32]`` with all-zero padding sub-images (which the model drops) and the processor's ``pixel_attention_mask``
    ``[batch, most sub-images, 32, 32]``; the tokens per sub-image from the model's own features."""
    g = torch.Generator().manual_seed(seed + 1000)
    grids = [[IDEFICS_GRIDS[(b + i) % len(IDEFICS_GRIDS)] for i in range(images)] for b in range(batch)]
    subimages = [sum(rows * cols + 1 for rows, cols in row) for row in grids]
    pixel_values = torch.zeros(batch, max(subimages), 3, 32, 32)
    pixel_mask = torch.zeros(batch, max(subimages), 32, 32, dtype=torch.long)
    for b, n in enumerate(subimages):
        pixel_values[b, :n] = torch.randn(n, 3, 32, 32, generator=g)
        pixel_mask[b, :n] = 1
    with torch.no_grad():
        per_subimage = len(model.model.get_image_features(pixel_values=pixel_values[:1, :1]).pooler_output[0])
    blocks = [[idefics_image_tokens(rows, cols, per_subimage) for rows, cols in row] for row in grids]
    return {**_assemble_blocks(blocks, seed, padding), "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_mask}


def qwen3_vl_video_batch(model, batch: int, seed: int = 0, padding: str = "left") -> dict[str, torch.Tensor]:
    """Qwen3-VL prompts with one image and one 4-frame video each, laid out as its processor does: the image
    between vision start/end, then each of the video's 2 temporal patches (4 visual tokens after the 2 x 2
    merge) after a timestamp word, between its own vision start/end; ``mm_token_type_ids`` 1 at image and
    2 at video tokens (M-RoPE positions)."""
    g = torch.Generator().manual_seed(seed + 1000)
    t, h, w = QWEN_GRID
    per_frame = h * w // 4
    image = [VISION_START] + [IMAGE_TOKEN] * (t * per_frame) + [VISION_END]
    frame = [VISION_START] + [VIDEO_TOKEN] * per_frame + [VISION_END]
    video = [FIRST_WORD, *frame, FIRST_WORD + 1, *frame]  # a timestamp word before each temporal patch
    inputs = _assemble_blocks([[image, video]] * batch, seed, padding)
    kinds = inputs["input_ids"]
    return {**inputs, "mm_token_type_ids": (kinds == IMAGE_TOKEN).long() + 2 * (kinds == VIDEO_TOKEN).long(),
            "pixel_values": torch.randn(batch * t * h * w, 3 * 2 * 4 * 4, generator=g),
            "image_grid_thw": torch.tensor([QWEN_GRID] * batch),
            "pixel_values_videos": torch.randn(batch * 2 * h * w, 3 * 2 * 4 * 4, generator=g),
            "video_grid_thw": torch.tensor([(2, h, w)] * batch)}


FAMILIES = {
    "llava": (tiny_llava, llava_batch),
    "llava_next": (tiny_llava_next, anyres_batch),
    "llava_onevision": (tiny_llava_onevision, anyres_batch),
    "qwen2_vl": (tiny_qwen2_vl, qwen_batch),
    "qwen2_5_vl": (lambda seed=0, attn="sdpa": tiny_qwen2_vl(seed, attn, version="2.5"), qwen_batch),
    "qwen3_vl": (tiny_qwen3_vl, qwen_batch),
    "gemma3": (tiny_gemma3, gemma3_batch),
    "internvl": (tiny_internvl, internvl_batch),
    "internvl_qwen3": (lambda seed=0, attn="sdpa": tiny_internvl(seed, attn, decoder="qwen3"), internvl_batch),
    "mistral3": (tiny_mistral3, mistral3_batch),
    "llava_next_video": (tiny_llava_next_video, video_batch),
    "idefics3": (tiny_idefics3, idefics_batch),
    "smolvlm": (tiny_smolvlm, idefics_batch),
}
CORE_FAMILIES = ("llava", "qwen2_vl", "qwen3_vl", "gemma3")
"""One family per decoder style (llama, qwen3, gemma3) and rotary kind (Qwen2-VL's M-RoPE)."""


def family_variants(first, *others) -> list:
    """pytest parameters ``(family, variant)``: every family with the ``first`` variant in the main run;
    with each of the ``others`` (variants that exercise family-agnostic code: eager attention, answer
    positions, a second plan), the :data:`CORE_FAMILIES` in the main run and the rest in the slow step
    (``pytest -m slow``), so the whole matrix still runs in CI."""
    import pytest

    params = [pytest.param(family, first, id=f"{family}-{first}") for family in FAMILIES]
    for variant in others:
        params += [pytest.param(family, variant, id=f"{family}-{variant}",
                                marks=() if family in CORE_FAMILIES else pytest.mark.slow) for family in FAMILIES]
    return params
