"""Save a training-free pruned model (weights + plan in its config) and load it back with the plan applied."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoProcessor, PreTrainedModel, ProcessorMixin

from .apply import CONFIG_KEY, apply_plan, applied_plan
from .files import atomic_write_dir
from .loading import load_model, save_model_dir
from .plan import EfficiencyPlan, n_decoder_layers


def save_pruned(model: PreTrainedModel, plan: EfficiencyPlan, path: str | os.PathLike,
                processor: ProcessorMixin | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (safetensors) with ``plan`` in its ``config.json`` (and ``processor``) to ``path``.

    The directory is written next to ``path`` first and renamed into place, so an existing
    directory is replaced whole or not at all (only with ``overwrite=True``, and only when eemllm wrote
    it: another folder raises :class:`~eemllm_models.files.ForeignFolderError`). Plain transformers
    loads the result as the unpruned model; :func:`load_pruned` loads it with the plan applied.
    """
    path = Path(path)
    plan.check_layers(n_decoder_layers(model), type(model).__name__)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True")
    previous = getattr(model.config, CONFIG_KEY, None)
    try:
        setattr(model.config, CONFIG_KEY, plan.to_dict())
        atomic_write_dir(path, lambda tmp: save_model_dir(model, processor, tmp))
    finally:
        if previous is None and applied_plan(model) is None:
            delattr(model.config, CONFIG_KEY)
        elif previous is not None:
            setattr(model.config, CONFIG_KEY, previous)
    return path


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                device_map: str | dict | None = None, implementation: str = "fast",
                ) -> tuple[PreTrainedModel, EfficiencyPlan]:
    """Load a directory written by :func:`save_pruned`: the model with its plan applied, and the plan."""
    model, _ = load_model(path, dtype=dtype, device_map=device_map, processor=False)
    data = getattr(model.config, CONFIG_KEY, None)
    if data is None:
        raise ValueError(f"{path} holds no eemllm plan in its config.json; load it with load_model, "
                         "or save it with save_pruned first")
    plan = EfficiencyPlan.from_dict(data)
    delattr(model.config, CONFIG_KEY)
    apply_plan(model, plan, implementation)
    return model, plan


def is_pruned(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by :func:`save_pruned` (its ``config.json`` carries a plan)."""
    config = Path(path).expanduser() / "config.json"
    return config.is_file() and CONFIG_KEY in json.loads(config.read_text())


def load_checkpoint(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    device_map: str | dict | None = None, attn_implementation: str | None = None,
                    implementation: str = "fast") -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model and processor of a zoo model (``default``, ``zoo:NAME``), a pruned folder (its plan
    applied) or any other model folder or hub name (:func:`~eemllm_models.load_model`)."""
    from .zoo import load_zoo, zoo_name

    if (zoo := zoo_name(name_or_path)) is not None:
        return load_zoo(zoo, torch.float32 if dtype == "auto" else dtype)
    if is_pruned(name_or_path):
        model, _ = load_pruned(name_or_path, dtype, device_map, implementation)
        return model, AutoProcessor.from_pretrained(str(Path(name_or_path).expanduser()))
    return load_model(name_or_path, dtype, device_map, attn_implementation)
