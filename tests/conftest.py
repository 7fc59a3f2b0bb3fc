"""Shared fixtures: models are loaded once per test session, exports written once."""

from __future__ import annotations

import pytest

from reference.export import export_model
from reference.loading import load


@pytest.fixture(scope="session")
def loaded_models():
    """``loaded_models(name)`` -> ``(model, tokenizer)``, loaded on first use and then reused.

    Tests must not modify the returned objects (e.g. the tokenizer's EOS ids):
    other tests see the same ones.
    """
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def dummy(loaded_models):
    return loaded_models("dummy")


@pytest.fixture(scope="session")
def dummy_draft(loaded_models):
    return loaded_models("dummy-draft")


@pytest.fixture(scope="session")
def smollm(loaded_models):
    return loaded_models("smollm2-135m")


@pytest.fixture(scope="session")
def exported_dummy_dir(tmp_path_factory):
    """``dummy`` written as a Hugging Face folder (float32)."""
    return export_model("dummy", tmp_path_factory.mktemp("exported") / "dummy")


@pytest.fixture(scope="session")
def exported_smollm_dir(tmp_path_factory):
    """``smollm2-135m`` written as an MLX-quantized Hugging Face folder (4-bit, group 32)."""
    return export_model("smollm2-135m", tmp_path_factory.mktemp("exported") / "smollm2-135m")
