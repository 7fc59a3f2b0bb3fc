"""Engine adapters: finding them by name, model formats, and what each adapter declares."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conformance_helpers import dummy_engine

from engines import models as model_sources
from engines import registry
from engines.adapters.base import event_from_logprobs
from engines.models import ModelUnavailable, resolve
from engines.protocol import GenerateRequest, ProcessorSettings, ProtocolError, Unsupported
from engines.registry import EngineUnavailable, engine_class, installed_peers, open_engine


def test_builtin_names_and_module_class_specs_resolve():
    assert engine_class("reference").__name__ == "ReferenceEngine"
    assert (
        engine_class("engines.adapters.reference:ReferenceEngine").__name__ == "ReferenceEngine"
    )
    with pytest.raises(EngineUnavailable, match="unknown engine 'vllm'"):
        engine_class("vllm")
    with pytest.raises(EngineUnavailable, match="has no class 'Nope'"):
        engine_class("engines.adapters.reference:Nope")


def test_a_missing_peer_is_engine_unavailable_with_the_install_command(monkeypatch):
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    with pytest.raises(EngineUnavailable) as error:
        open_engine("transformers", "dummy")
    assert not isinstance(error.value, ImportError)
    assert "missing: torch" in str(error.value) and "pip install" in str(error.value)
    assert "transformers" not in installed_peers()


def test_model_formats():
    assert resolve("dummy", ("builtin",)).path is None
    folder = resolve("dummy", ("gguf", "hf-float-folder")).path
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert resolve("smollm2-135m", ("gguf", "hf-float-folder")).path.suffix == ".gguf"
    with pytest.raises(ModelUnavailable, match="accepts only gguf"):
        resolve("dummy", ("gguf",))
    with pytest.raises(ModelUnavailable, match="unknown model 'tiny'"):
        resolve("tiny", ("builtin",))


def test_exports_are_redone_when_the_reference_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCONFORM_HOME", str(tmp_path))
    monkeypatch.setattr(model_sources, "reference_fingerprint", lambda: "version-1")
    folder = model_sources.exported_folder("dummy-draft")
    stamp = json.loads((folder / model_sources.STAMP).read_text())
    assert stamp == {"model": "dummy-draft", "fingerprint": "version-1"}
    (folder / "marker").write_text("old export")
    assert model_sources.exported_folder("dummy-draft") == folder and (folder / "marker").exists()
    monkeypatch.setattr(model_sources, "reference_fingerprint", lambda: "version-2")
    model_sources.exported_folder("dummy-draft")
    assert not (folder / "marker").exists()
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [
        "dummy-draft"
    ]  # no staging left



def test_the_export_fingerprint_covers_the_families_in_subpackages(monkeypatch, tmp_path):
    # The families live in reference/models/: a change there must redo cached exports.
    (tmp_path / "models").mkdir()
    (tmp_path / "loading.py").write_text("top level")
    family = tmp_path / "models" / "gemma.py"
    family.write_text("norm = 1 + weight")
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: spec)
    before = model_sources.reference_fingerprint()
    family.write_text("norm = weight")
    assert model_sources.reference_fingerprint() != before

def test_event_from_logprobs_checks_the_vector_and_ranks_the_top():
    vector = np.log(np.array([0.1, 0.6, 0.3]))
    event = event_from_logprobs(2, vector, 3, 2, text="x")
    assert event.token == 2 and event.logprob == pytest.approx(np.log(0.3)) and event.text == "x"
    assert [t for t, _ in event.top_logprobs] == [1, 2]
    with pytest.raises(ProtocolError, match="logprob vector has 3 entries; the vocabulary has 4"):
        event_from_logprobs(0, vector, 4, 0)
    with pytest.raises(ProtocolError, match="token 3 is outside"):
        event_from_logprobs(3, vector, 3, 0)


def test_the_reference_adapter_declares_batch_only_with_a_batch_generator():
    import reference

    engine = dummy_engine("reference")
    assert ("batch" in engine.capabilities) == hasattr(reference, "BatchGenerator")
    assert {
        "greedy",
        "stream",
        "logprobs",
        "speculative",
        "prompt_cache",
        "score",
    } <= engine.capabilities


@pytest.mark.peer
def test_the_mlx_lm_adapter_builds_a_bounded_cache_that_keeps_4_sinks():
    engine = dummy_engine("mlx-lm")
    cache = engine.rotating_cache(16)
    assert len(cache) == len(engine.model.layers)
    assert (cache[0].max_size, cache[0].keep) == (16, 4)


@pytest.mark.peer
def test_the_transformers_adapter_refuses_what_transformers_cannot_express():
    engine = dummy_engine("transformers")
    refused = [
        GenerateRequest(prompt=[65], processors=ProcessorSettings(presence_penalty=0.5)),
        GenerateRequest(prompt=[65] * 30, processors=ProcessorSettings(repetition_penalty=1.2)),
        GenerateRequest(prompt=[65], prefill_step_size=2),
    ]
    for request in refused:
        with pytest.raises(Unsupported):
            list(engine.generate(request))
    # A penalty window covering the whole context is transformers' own semantics: accepted.
    fine = GenerateRequest(
        prompt=[65] * 3, max_tokens=2, processors=ProcessorSettings(repetition_penalty=1.2)
    )
    assert len(list(engine.generate(fine))) == 2
