"""The embedded default model (a trained LLaVA, see ``default/README.md``) and its benchmark."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..loading import check_model_dir, from_pretrained

_REINSTALL = "reinstall eemllm (pip install --force-reinstall --no-deps eemllm) or retrain it with " \
             "python -m eemllm_models.zoo.train --out DIR"


def default_model_path() -> Path:
    """Directory of the shipped default model (config, safetensors weights, processor)."""
    return Path(__file__).resolve().parent / "default"


def load_default(dtype: torch.dtype = torch.float32) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The shipped default ``LlavaForConditionalGeneration`` (eval mode) and its ``LlavaProcessor``.

    Its weights are checked against their recorded checksum first, so a damaged install fails
    with a clear error instead of giving wrong answers.
    """
    path = default_model_path()
    check_model_dir(path, fix=_REINSTALL)
    return from_pretrained(path, dtype=dtype)
