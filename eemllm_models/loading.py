"""Loading HF image-text models with their processors, with errors that say what to do."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

CHECKSUM_FILE = "checksums.json"


class ModelLoadError(OSError):
    """A model directory or hub name could not be loaded; the message says why and what to do."""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    return [path / "model.safetensors"]


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(path: Path) -> None:
    """Record the SHA-256 of every weights file of the model saved in ``path``."""
    sums = {f.name: sha256(f) for f in _weight_files(path)}
    (path / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


def save_model_dir(model: PreTrainedModel, processor: ProcessorMixin | None, path: Path) -> None:
    """Save ``model`` (safetensors), its ``processor`` if given, and the weights' checksums into ``path``."""
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)
    write_checksums(path)


def check_model_dir(path: Path, fix: str) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` holds a complete, readable safetensors model.

    Checks that ``config.json`` and every weights file exist, that each weights file has a valid
    safetensors header, and, where ``checksums.json`` is present, that the bytes match it.
    ``fix`` is the remedy appended to every message.
    """
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a saved model; {fix}")
    expected = json.loads((path / CHECKSUM_FILE).read_text()) if (path / CHECKSUM_FILE).is_file() else {}
    for weights in _weight_files(path):
        if not weights.is_file():
            raise ModelLoadError(f"weights file {weights} is missing; {fix}")
        try:
            with safe_open(weights, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"weights file {weights} is corrupted ({err}); {fix}") from err
        if weights.name in expected and sha256(weights) != expected[weights.name]:
            raise ModelLoadError(f"weights file {weights} does not match its recorded checksum (corrupted or "
                                 f"modified); {fix}")


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    processor: bool = True,
) -> tuple[PreTrainedModel, ProcessorMixin | None]:
    """Load an image-text model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) and its processor, in eval mode.

    ``name_or_path`` is a local directory or a hub name (served from the local HF cache when
    offline); ``device_map`` is passed to accelerate for models larger than one device. With
    ``processor=False`` only the model is loaded and ``None`` stands for the processor.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        check_model_dir(local, fix="re-save the model, or point to another directory")
        return from_pretrained(local, dtype, device_map, attn_implementation, processor)
    return from_pretrained(str(name_or_path), dtype, device_map, attn_implementation, processor)


def from_pretrained(
    source: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    processor: bool = True,
) -> tuple[PreTrainedModel, ProcessorMixin | None]:
    """:func:`load_model` without the directory check: the Auto classes, with a clear error."""
    try:
        loaded_processor = AutoProcessor.from_pretrained(str(source)) if processor else None
        model = AutoModelForImageTextToText.from_pretrained(
            str(source), dtype=dtype, device_map=device_map, attn_implementation=attn_implementation
        )
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set: download it into the HF cache on a machine with network first, or pass "
            "a local directory" if offline else "check the name, or pass a local directory"
        )
        raise ModelLoadError(f"could not load model {str(source)!r} ({err}); {hint}") from err
    return model.eval(), loaded_processor
