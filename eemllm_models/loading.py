"""Loading HF image-text models with their processors, with errors that say what to do."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

CHECKSUM_FILE = "checksums.json"
HUB_TIMEOUT_S = 3.0
"""Seconds the hub may take to answer a connection before a hub id is served from the local cache only."""

logger = logging.getLogger(__name__)


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


def looks_like_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a local folder rather than a hub id (``org/name``).

    True for a path object, a name starting with ``.``, ``~`` or a separator, one with a backslash
    or more than one ``/``, one that is not a valid hub id, and one whose first part exists here
    (``models/llava`` when ``models/`` does).
    """
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    if text.startswith((".", "~", "/", os.sep)) or "\\" in text or text.count("/") > 1:
        return True
    if "/" in text and Path(text.split("/")[0]).expanduser().exists():
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _hub_offline() -> bool:
    import huggingface_hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint (or the HTTPS proxy, when one is set) accepts a TCP connection
    within ``timeout`` seconds, name resolution included. Costs one connection, no request."""
    import huggingface_hub

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else
                   huggingface_hub.constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def hub_unreachable(source: str | os.PathLike) -> bool:
    """True when ``source`` is a hub id (no local path), ``HF_HUB_OFFLINE`` is unset and the hub does
    not answer within :data:`HUB_TIMEOUT_S`: then load it with ``local_files_only=True`` (the cache)
    instead of waiting through minutes of retries."""
    return not Path(source).expanduser().exists() and not _hub_offline() and not hub_reachable()


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

    A name that looks like a path (:func:`looks_like_path`) but names no folder raises
    :class:`ModelLoadError` at once instead of being tried as a hub id. A hub id is tried on the
    network only when the hub answers within :data:`HUB_TIMEOUT_S` seconds (and ``HF_HUB_OFFLINE``
    is unset); otherwise it is served from the local HF cache alone, so an offline machine fails in
    seconds, not after minutes of retries.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        check_model_dir(local, fix="re-save the model, or point to another directory")
        return from_pretrained(local, dtype, device_map, attn_implementation, processor)
    if looks_like_path(name_or_path):
        raise ModelLoadError(f"no model folder at {local}; pass the folder a model was saved to "
                             "(save_pretrained or save_pruned), or a hub id such as 'llava-hf/llava-1.5-7b-hf'")
    return from_pretrained(str(name_or_path), dtype, device_map, attn_implementation, processor)


def from_pretrained(
    source: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    processor: bool = True,
) -> tuple[PreTrainedModel, ProcessorMixin | None]:
    """:func:`load_model` without the directory check: the Auto classes, with a clear error."""
    import huggingface_hub

    hub = not Path(source).expanduser().exists()
    offline = _hub_offline()
    unreachable = hub_unreachable(source)
    endpoint = huggingface_hub.constants.ENDPOINT
    if unreachable:
        logger.warning("%s did not answer within %.0f s; loading %s from the local HF cache only",
                       endpoint, HUB_TIMEOUT_S, source)
    cache_only = {"local_files_only": True} if unreachable else {}
    try:
        loaded_processor = AutoProcessor.from_pretrained(str(source), **cache_only) if processor else None
        model = AutoModelForImageTextToText.from_pretrained(
            str(source), dtype=dtype, device_map=device_map, attn_implementation=attn_implementation, **cache_only
        )
    except OSError as err:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        if not hub:
            hint = "check the folder, or pass another one"
        elif offline:
            hint = (f"HF_HUB_OFFLINE is set and the HF cache ({cache}) has no complete copy: download it first on "
                    f"a machine with network (`hf download {source}`), or pass a local directory")
        elif unreachable:
            hint = (f"{endpoint} did not answer within {HUB_TIMEOUT_S:.0f} s and the HF cache ({cache}) has no "
                    f"complete copy: download it first on a machine with network (`hf download {source}`) or "
                    "pass a local directory; set HF_HUB_OFFLINE=1 to skip the network check when working offline")
        else:
            hint = "check the name, or pass a local directory"
        raise ModelLoadError(f"could not load model {str(source)!r} ({err}); {hint}") from err
    return model.eval(), loaded_processor
