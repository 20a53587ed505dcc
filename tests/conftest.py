"""Every test runs offline: nothing may reach a model or data hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """The shipped default model and processor, loaded once per test session."""
    from eemllm_models import load_default

    return load_default()
