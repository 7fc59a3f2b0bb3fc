"""An engine's declared numerics pick the profile it is judged under
(``conformance.profiles.profile_for_engine``): llama.cpp rounds activations to 8 bits
inside quantized matmuls, so on a 4-bit model it is judged under q4q8, not q4."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conformance import profiles
from conformance.profiles import PROFILES, profile_for_engine
from conformance.report import format_matrix
from conformance.runner import run_matrix
from engines.adapters.llama_cpp import LlamaCppEngine
from engines.adapters.reference import ReferenceEngine


class EightBitActivations(ReferenceEngine):
    """The reference declaring 8-bit activations (its answers stay the reference's)."""

    name = "reference-a8"
    activation_bits = 8


@pytest.mark.parametrize(
    ("model_profile", "bits", "judged"),
    [("q4", 8, "q4q8"), ("q4", None, "q4"), ("q4", 4, "q4"), ("fp32", 8, "fp32")],
)
def test_8_bit_activations_turn_q4_into_q4q8_only(model_profile, bits, judged):
    engine = SimpleNamespace(activation_bits=bits)
    assert profile_for_engine(PROFILES[model_profile], engine).name == judged


def test_the_users_profile_wins_over_the_engines_numerics():
    engine = SimpleNamespace(activation_bits=8)
    assert profile_for_engine(PROFILES["q4"], engine, override="q4").name == "q4"


def test_an_engine_declaring_nothing_keeps_the_models_profile():
    assert profile_for_engine(PROFILES["q4"], object()).name == "q4"


def test_llama_cpp_declares_8_bit_activations_and_the_reference_none():
    assert LlamaCppEngine.activation_bits == 8
    assert ReferenceEngine.activation_bits is None


def test_the_runner_judges_each_engine_under_its_own_profile(monkeypatch):
    # dummy judged as a 4-bit model, so that the declared activations matter.
    monkeypatch.setitem(profiles.DEFAULT_PROFILE, "dummy", "q4")
    engines = ["reference", "test_engine_profiles:EightBitActivations"]
    results = run_matrix(engines, ["dummy"], pattern="greedy/hello")
    judged = {r.engine: r.profile for r in results}
    assert judged == {"reference": "q4", "reference-a8": "q4q8"}
    report = format_matrix(results)
    assert "profile q4: near-tie below 0.1 nats" in report
    assert "profile q4q8: near-tie below 0.7 nats" in report
    assert "or probabilities within 0.12" in report


def test_a_profile_named_by_the_user_is_used_for_every_engine(monkeypatch):
    monkeypatch.setitem(profiles.DEFAULT_PROFILE, "dummy", "q4")
    engines = ["reference", "test_engine_profiles:EightBitActivations"]
    results = run_matrix(engines, ["dummy"], pattern="greedy/hello", profile_name="fp32")
    assert {r.profile for r in results} == {"fp32"}
