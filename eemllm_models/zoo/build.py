"""Architecture, tokenizer and processor of the embedded default model (before training).

The default is a real ``LlavaForConditionalGeneration``: a 3-layer CLIP vision tower on
160 px images with 16 px patches (100 visual tokens per image once the CLS token is dropped,
as llava-1.5 does), the two-layer GELU projector, and a 12-layer Llama decoder. Its processor is
a ``LlavaProcessor`` with a word-level ``tokenizer.json`` and llava-hf's llava-1.5 chat template,
so ``processor.apply_chat_template(messages, add_generation_prompt=True)`` gives
``"USER: <image>\\n{question} ASSISTANT:"`` exactly as for ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from . import shapes_vqa

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# llava-hf's chat template for the llava-1.5 checkpoints (USER/ASSISTANT turns, images first).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORD = re.compile(r"\w+|[^\w\s]+")


def _vocabulary() -> list[str]:
    """Every word the chat template and shapes-vqa can produce, plus digits and capitals."""
    words = {"USER", "ASSISTANT", ":", "\n"} | set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    for i in range(400):
        scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", i, seed=12345))
        for q in scene.questions:
            words.update(_WORD.findall(q.question))
            words.update(_WORD.findall(q.answer))
    words.discard("\n")
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (``tokenizer.json``) that adds ``<s>`` like Llama's tokenizer."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *_vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1024,
    )


def build_image_processor() -> CLIPImageProcessor:
    """The CLIP image processor of the zoo's LLaVA models: shapes-vqa's 160 px images, CLIP's normalisation."""
    size = shapes_vqa.IMAGE_SIZE
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_processor() -> LlavaProcessor:
    """The default model's ``LlavaProcessor`` (CLIP image processor at 160 px + tokenizer)."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The default model's ``LlavaConfig`` for ``tokenizer``'s vocabulary."""
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=shapes_vqa.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(shapes_vqa.IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_untrained(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised default model (seeded) and its processor."""
    import torch

    processor = build_processor()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor
