"""Prompting and batched greedy answering with any HF image-text model and its processor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin


def build_prompt(processor: ProcessorMixin, question: str, n_images: int = 1) -> str:
    """The processor's chat-template prompt for one user turn with ``n_images`` images first.

    A template that writes the BOS token itself (Gemma 3's, Llama 3's) has it removed when the
    tokenizer adds one on encoding, so the encoded prompt starts with one BOS, not two."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text


def images_per_prompt(processor: ProcessorMixin, images: Sequence[Image.Image],
                      prompts: Sequence[str]) -> list[list[Image.Image]] | list[Image.Image]:
    """``images`` (in prompt order) as one list per prompt, each taking as many as its text holds the
    processor's image placeholder: Gemma 3's processor reads a flat list as all of one prompt's images.
    Left flat when the placeholders do not account for every image or a prompt has none."""
    images = list(images)
    token = getattr(processor, "image_token", None)
    counts = [prompt.count(token) for prompt in prompts] if token else []
    if not counts or min(counts) == 0 or sum(counts) != len(images):
        return list(images)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [images[start:start + count] for start, count in zip(starts, counts)]


def encode_prompts(model: PreTrainedModel, processor: ProcessorMixin, images: Sequence[Image.Image] | None,
                   prompts: Sequence[str], padding_side: str | None = None):
    """``processor`` output for ``prompts`` and their ``images``, padded (on ``padding_side``, default the
    tokenizer's), on ``model``'s device with pixel inputs in its dtype: ``input_ids`` ``[batch, seq]``, ..."""
    side = {} if padding_side is None else {"padding_side": padding_side}
    grouped = None if images is None else images_per_prompt(processor, images, prompts)
    batch = processor(images=grouped, text=list(prompts), return_tensors="pt", padding=True, **side).to(model.device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy answers (special tokens stripped) to ``questions[i]`` about ``images[i]``.

    Batches are padded on the tokenizer's padding side; each batch runs one ``generate()`` call
    with the KV cache.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; pass one image per question")
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="answering", unit="batch", disable=not progress or len(starts) < 2):
        prompts = [build_prompt(processor, q) for q in questions[start : start + batch_size]]
        batch = encode_prompts(model, processor, images[start : start + batch_size], prompts)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [a.strip() for a in processor.batch_decode(out[:, batch["input_ids"].shape[1] :],
                                                               skip_special_tokens=True)]
    return answers
