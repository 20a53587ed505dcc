"""Token counts of real prompts, which FLOPs counts and policies need."""

from __future__ import annotations

from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import build_prompt, load_shapes_vqa, token_layout

from .flops import TokenCounts


def prompt_token_counts(model: PreTrainedModel, processor: ProcessorMixin, image: Image.Image,
                        question: str) -> TokenCounts:
    """Text and visual tokens of the chat-template prompt that asks ``question`` about ``image``."""
    ids = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt")["input_ids"]
    return TokenCounts.from_layout(token_layout(model, ids))


def shapes_vqa_token_counts(model: PreTrainedModel, processor: ProcessorMixin) -> TokenCounts:
    """Token counts of the first shapes-vqa test prompt (its images all have the same size)."""
    row = load_shapes_vqa("test", n=1)[0]
    return prompt_token_counts(model, processor, row["image"], row["question"])
