"""Architecture mutants: the classic per-family bugs, each caught through the conformance suite.

A mutant is the reference adapter whose freshly loaded model has one bug of the
kind engines ship when they port an architecture: Gemma's ``1 + weight`` norm
read as ``weight``, its embedding scale or soft-caps dropped, the local window
given to the global layers, Qwen3's q/k norms skipped, Qwen2's biases dropped,
Phi-3's partial RoPE applied to every dimension, MoE gates renormalised where
the model says not to (or not where it says to). Each runs the family's
catalogue cases (the "architecture-sensitive cases" of ``cases.toml``) against
the live reference, and the cases it names must FAIL with a finding; the
unbroken adapter must pass all of them on every family.

``tests/test_architectures.py`` catches the same bugs by logit differences
against transformers; here they must be caught by what an engine author runs:
``lmconform check``. Bugs are planted in the mutant's own model instances (a
module's class swapped for a broken subclass, an attribute changed), never in
the shared classes, so the reference that judges them stays correct.
"""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import reference
from conformance.catalogue import build_request, load_cases, select_cases
from conformance.comparator import FAIL, PASS, compare_traces
from conformance.conditioning import conditioning_of
from conformance.oracle import ReferenceOracle
from conformance.profiles import profile_for_model
from conformance.runner import run_cases
from conformance.snapshots.store import GOLDEN_DIR, read_group, snapshot_groups
from engines.adapters.reference import ReferenceEngine
from engines.models import DEFAULT_MODELS, FAMILY_MODELS, FLOAT_MODELS, ModelSource
from engines.protocol import Trace
from reference.dummy import DUMMY_MODELS
from reference.models import gemma, llama, moe, qwen

LONG_PROMPT = "greedy/family_long_prompt"
BATCH = "batch/family_rows"
EMBEDDINGS = "embeddings/family_from_tokens"
# The reference's greedy margins along every answer of the family cases stay at least
# this far above the fp32 tie epsilon (0.01), so no correct engine meets a near-tie.
MIN_MARGIN = 0.05


# -- bugs, each applied to one model instance -------------------------------------------------


class NoOffsetRMSNorm(gemma.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)  # weight, not 1 + weight


class UnscaledGemmaModel(gemma.GemmaModel):
    embed = llama.LlamaModel.embed  # rows not multiplied by sqrt(hidden_size)


class NoQKNormAttention(qwen.Qwen3Attention):
    project = llama.Attention.project  # q_norm and k_norm never applied


def swap_class(module, broken: type) -> None:
    """This instance (only) behaves as ``broken``, a subclass of its class."""
    assert issubclass(broken, type(module)), (broken, type(module))
    module.__class__ = broken


def norm_offset_dropped(model) -> None:
    for module in model.modules():
        if type(module) is gemma.RMSNorm:
            swap_class(module, NoOffsetRMSNorm)


def embedding_scale_missing(model) -> None:
    swap_class(model.model, UnscaledGemmaModel)


def attention_softcap_skipped(model) -> None:
    for layer in model.layers:
        layer.self_attn.softcap = None


def final_softcap_skipped(model) -> None:
    model.args = replace(model.args, final_logit_softcapping=None)


def window_on_wrong_layers(model) -> None:
    """Each layer gets its neighbour's window: local layers attend globally and vice versa."""
    windows = [layer.self_attn.window for layer in model.layers]
    assert len(set(windows)) > 1, "the model has no local/global alternation to break"
    for layer, window in zip(model.layers, windows[1:] + windows[:1]):
        layer.self_attn.window = window  # make_cache reads it: the caches follow


def qk_norm_skipped(model) -> None:
    for layer in model.layers:
        swap_class(layer.self_attn, NoQKNormAttention)


def qkv_bias_dropped(model) -> None:
    for layer in model.layers:
        attention = layer.self_attn
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
            proj.bias = mx.zeros_like(proj.bias)


def rotary_on_all_dims(model) -> None:
    for layer in model.layers:
        attention = layer.self_attn
        attention.rope = replace(attention.rope, dims=attention.head_dim)


def gate_renormalisation_flipped(model) -> None:
    """Gates renormalised where the config says not to (Qwen2-MoE), or not where it says to."""
    for module in model.modules():
        if isinstance(module, moe.SparseMoE):
            module.normalize = not module.normalize


# -- the mutants -----------------------------------------------------------------------------


class FamilyEngine(ReferenceEngine):
    """The reference adapter on a model of its own, loaded fresh and then ``break_model``-ed."""

    name = "family-control"
    bug = "none"
    caught_by: tuple[str, ...] = ()

    def load(self, source):
        model, tokenizer = reference.load(source.name)  # fresh: the bug must not leak
        self.break_model(model)
        return model, tokenizer

    def break_model(self, model) -> None:
        pass


def mutant(model: str, bug, caught_by: tuple[str, ...]) -> tuple[str, type[FamilyEngine]]:
    engine = type(
        f"{bug.__name__}_{model}",
        (FamilyEngine,),
        {
            "name": f"mutant-{bug.__name__}",
            "bug": (bug.__doc__ or bug.__name__.replace("_", " ")).strip(),
            "caught_by": caught_by,
            "break_model": staticmethod(bug),
        },
    )
    return model, engine


# Every bug changes the logits everywhere, so the long prompt catches it; window bugs
# show only past the 16-token window, which the long prompt and the long batch rows cross.
MUTANTS = [
    mutant("dummy-gemma", norm_offset_dropped, (LONG_PROMPT,)),
    mutant("dummy-gemma3", norm_offset_dropped, (LONG_PROMPT,)),
    mutant("dummy-gemma", embedding_scale_missing, (LONG_PROMPT,)),
    mutant("dummy-gemma3", embedding_scale_missing, (LONG_PROMPT,)),
    mutant("dummy-gemma", attention_softcap_skipped, (LONG_PROMPT,)),
    mutant("dummy-gemma", final_softcap_skipped, (LONG_PROMPT,)),
    mutant("dummy-gemma", window_on_wrong_layers, (LONG_PROMPT, BATCH)),
    mutant("dummy-gemma3", window_on_wrong_layers, (LONG_PROMPT, BATCH)),
    mutant("dummy-qwen2", window_on_wrong_layers, (LONG_PROMPT, BATCH)),
    mutant("dummy-qwen3", qk_norm_skipped, (LONG_PROMPT,)),
    mutant("dummy-moe", qk_norm_skipped, (LONG_PROMPT,)),
    mutant("dummy-qwen2", qkv_bias_dropped, (LONG_PROMPT,)),
    mutant("dummy-phi3", rotary_on_all_dims, (LONG_PROMPT,)),
    mutant("dummy-moe", gate_renormalisation_flipped, (LONG_PROMPT,)),
    mutant("dummy-mixtral", gate_renormalisation_flipped, (LONG_PROMPT,)),
    mutant("dummy-qwen2-moe", gate_renormalisation_flipped, (LONG_PROMPT,)),
]


def family_cases(model: str):
    return select_cases(load_cases(), model)


_oracles: dict[str, ReferenceOracle] = {}


def oracle_for(model: str) -> ReferenceOracle:
    if model not in _oracles:
        _oracles[model] = ReferenceOracle(model)
    return _oracles[model]


def test_every_family_model_is_in_the_model_table_and_the_default_matrix():
    families = {name for name in DUMMY_MODELS if name not in ("dummy", "dummy-draft")}
    assert set(FAMILY_MODELS) == families
    assert set(FAMILY_MODELS) <= set(FLOAT_MODELS) & set(DEFAULT_MODELS)
    for model in FAMILY_MODELS:
        assert profile_for_model(model).name == "fp32"
        ids = {c.id for c in family_cases(model)}
        assert {LONG_PROMPT, BATCH} <= ids and len(ids) >= 6, model


def test_every_family_mutant_has_a_distinct_bug_and_names_cases_that_exist():
    ids = {c.id for c in load_cases()}
    assert len(MUTANTS) >= 12
    assert len({(model, engine.bug) for model, engine in MUTANTS}) == len(MUTANTS)
    for model, engine in MUTANTS:
        assert engine.caught_by and set(engine.caught_by) <= ids
        assert set(engine.caught_by) <= {c.id for c in family_cases(model)}, (model, engine)


@pytest.mark.parametrize(("model", "engine"), MUTANTS, ids=[f"{m}-{e.name}" for m, e in MUTANTS])
def test_every_architecture_bug_is_caught_by_its_case(model, engine):
    oracle = oracle_for(model)
    cases = [c for c in family_cases(model) if c.id in engine.caught_by]
    mutant_engine = engine(ModelSource(model, "builtin"))
    try:
        results = run_cases(cases, mutant_engine, oracle, oracle.default_profile())
    finally:
        mutant_engine.close()
    for result in results:
        assert result.verdict == FAIL, f"{engine.name} on {model} passed {result.case_id}"
        assert not result.reason.startswith(("catalogue", "timeout")), result.reason
        assert result.failures(), result.reason  # caught by a comparison, not by a crash


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_the_unbroken_reference_passes_every_family_case(model):
    oracle = oracle_for(model)
    engine = FamilyEngine(ModelSource(model, "builtin"))
    try:
        results = run_cases(family_cases(model), engine, oracle, oracle.default_profile())
    finally:
        engine.close()
    verdicts = {r.case_id: r.verdict for r in results}
    assert set(verdicts.values()) == {PASS}, {
        r.case_id: r.reason or [f.summary for f in r.failures()] for r in results
    }


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_every_answer_of_the_family_cases_is_well_conditioned(model):
    """Along every reference answer in the family's golden snapshots (which
    ``test_snapshots.py`` keeps equal to the live reference), the smallest top-1/top-2
    margin is at least ``MIN_MARGIN`` nats: 5 times the fp32 tie epsilon."""
    epsilon = profile_for_model(model).tie_epsilon
    assert MIN_MARGIN >= 5 * epsilon
    margins = {}
    for group in snapshot_groups(GOLDEN_DIR, model):
        for case_id, case in read_group(GOLDEN_DIR, model, group).cases.items():
            for n, answer in enumerate(case.answers):
                if answer.kind == "generate":
                    margins[case_id, n] = conditioning_of(answer.trace, epsilon).min_margin
    assert {case_id for case_id, _ in margins} == {c.id for c in family_cases(model)}
    assert all(m is not None and m >= MIN_MARGIN for m in margins.values()), margins


# -- mlx-lm on the families: every fail explained --------------------------------------------

# mlx-lm 0.32.2 has no sliding window for qwen2 and gemma2 (every layer attends globally),
# so wherever a path goes past the 16-token window it differs; its bounded cache
# (max_kv_size 12, smaller than the window, in every layer) agrees. On gemma2 its batch
# generation also crashes: the soft-capped attention cannot broadcast the batch mask.
# Its gemma2, phi3 and qwen2_moe models take no input embeddings (unsupported).
WINDOW_CASES = {
    LONG_PROMPT,
    BATCH,
    EMBEDDINGS,
    "prompt_cache/family_continuation",
    "speculative/family_self_draft",
    "stream/family_equals_nonstream",
}
MLX_LM_FAILS = {"dummy-qwen2": WINDOW_CASES, "dummy-gemma": WINDOW_CASES - {EMBEDDINGS}}
MLX_LM_NO_EMBEDDINGS = ("dummy-gemma", "dummy-phi3", "dummy-qwen2-moe")


def drop_windows(model) -> None:
    """Every layer global, as mlx-lm builds qwen2 and gemma2."""
    for layer in model.layers:
        layer.self_attn.window = None


class WindowlessReference(FamilyEngine):
    name = "reference-without-windows"
    break_model = staticmethod(drop_windows)


@pytest.mark.peer
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_mlx_lm_fails_only_where_it_lacks_the_sliding_window(model):
    from engines.registry import open_engine

    engine = open_engine("mlx-lm", model)
    try:
        live = run_cases(family_cases(model), engine, oracle_for(model), profile_for_model(model))
        verdicts = {r.case_id: r.verdict for r in live}
        assert {c for c, v in verdicts.items() if v == FAIL} == MLX_LM_FAILS.get(model, set())
        unsupported = {EMBEDDINGS} if model in MLX_LM_NO_EMBEDDINGS else set()
        assert {c for c, v in verdicts.items() if v == "unsupported"} == unsupported
        if model not in MLX_LM_FAILS:
            return
        # The explanation, checked: against the reference without windows only gemma2's
        # batch crash remains.
        windowless = ReferenceOracle(
            model, engine=WindowlessReference(ModelSource(model, "builtin"))
        )
        results = run_cases(family_cases(model), engine, windowless, profile_for_model(model))
    finally:
        engine.close()
    still = {r.case_id: r.reason for r in results if r.verdict == FAIL}
    if model == "dummy-gemma":
        assert set(still) == {BATCH} and "broadcast_shapes" in still[BATCH], still
    else:
        assert still == {}


# -- transformers on the families: every fail explained --------------------------------------

# transformers 5's Gemma 2 and Gemma 3 take ``inputs_embeds`` as already multiplied by
# sqrt(hidden_size); the protocol's embeddings (like mlx-lm's and the reference's) are the
# embedding matrix's rows, scaled by the model. Bounded caches and prompt-cache reuse
# cannot be expressed through its generation API (unsupported, not failed).
TRANSFORMERS_FAILS = {"dummy-gemma": {EMBEDDINGS}, "dummy-gemma3": {EMBEDDINGS}}
TRANSFORMERS_UNSUPPORTED = {
    "sliding_window/family_decode_rotation",
    "prompt_cache/family_continuation",
}


@pytest.mark.peer
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_transformers_fails_only_on_gemmas_pre_scaled_embeddings(model):
    from engines.registry import open_engine

    oracle, profile = oracle_for(model), profile_for_model(model)
    engine = open_engine("transformers", model)
    try:
        results = run_cases(family_cases(model), engine, oracle, profile)
        verdicts = {r.case_id: r.verdict for r in results}
        assert {c for c, v in verdicts.items() if v == FAIL} == TRANSFORMERS_FAILS.get(model, set())
        assert {c for c, v in verdicts.items() if v == "unsupported"} == TRANSFORMERS_UNSUPPORTED
        if model not in TRANSFORMERS_FAILS:
            return
        # The explanation, checked: the rows multiplied by sqrt(hidden_size) (8: exact in
        # float32) give transformers the reference's answer to the unscaled rows.
        case = next(c for c in family_cases(model) if c.id == EMBEDDINGS)
        rows = build_request({**case.request, **case.params["variants"][0]}, oracle)
        scale = math.sqrt(len(rows.prompt_embeddings[0]))
        scaled = replace(
            rows, prompt_embeddings=(np.array(rows.prompt_embeddings) * scale).tolist()
        )
        answer = Trace(list(engine.generate(replace(scaled, top_logprobs=5))))
    finally:
        engine.close()
    assert compare_traces(oracle.answer(rows), answer, profile, oracle.decode).verdict == PASS
