"""Engines as the benchmarks open them (benchmarks/engines.py), on the ``dummy`` model.

What timing an engine needs besides its events: exactly the asked number of tokens
(end tokens banned by the request's logit bias), one token per sequence in every
batched step, draft tokens flagged, the weight bytes the roofline divides by, and
events delivered as they are produced (lazily), not after the whole generation.
"""

import importlib.util
import math
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from benchmarks import memory
from benchmarks.engines import TimedEngine, open_timed, parse_bench_spec, split_specs
from engines.protocol import GenerateRequest
from engines.registry import EngineUnavailable

# For ``dummy``, greedy decoding of this prompt emits an EOS id as its first token.
EOS_PROMPT = " nobody else"
KINDS = ["reference", "mlx-lm", "transformers"]
NEEDS = {"mlx-lm": "mlx_lm", "transformers": "torch"}


@pytest.fixture(scope="module", params=KINDS)
def engine(request):
    module = NEEDS.get(request.param)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{request.param} is not installed: pip install 'lmconform[peers]'")
    opened = open_timed(request.param, "dummy")
    yield opened
    opened.close()


def tokens(engine, prompt, max_tokens, draft=None) -> list:
    request = engine.request(engine.encode(prompt), max_tokens, draft=draft)
    return list(engine.generate(request))


def test_generation_length_is_exact_even_where_the_model_would_stop(engine):
    # Without the bias this prompt ends at once: its first token is an end token.
    unbanned = list(engine.adapter.generate(
        GenerateRequest(prompt=engine.encode(EOS_PROMPT), max_tokens=24)
    ))
    assert [e.finish_reason for e in unbanned] == ["stop"]
    assert unbanned[0].token in engine.profile.end_tokens
    assert len(tokens(engine, EOS_PROMPT, 24)) == 24
    assert len(tokens(engine, "Hello, world!", 1)) == 1


def test_speculative_generation_flags_draft_tokens(engine):
    events = tokens(engine, "The quick brown fox", 24, draft="dummy-draft")
    assert len(events) == 24
    if engine.name == "transformers":  # it does not say which tokens the draft made
        assert {e.from_draft for e in events} == {None}
        return
    flags = [e.from_draft for e in events]
    assert any(flags) and not all(flags)  # some tokens accepted from the draft, not all


def test_batched_steps_yield_one_token_per_sequence(engine):
    if engine.name == "transformers":  # its batches come back whole: reported, not timed
        assert "no stream_batch" in engine.unsupported("batch")
        return
    assert engine.unsupported("batch") is None
    prompts = [engine.encode(p)[:6] for p in ("Hello, world!", EOS_PROMPT * 2, "Once upon")]
    rows = [row for row, _ in engine.stream_batch(engine.batch_request(prompts, 5))]
    assert sorted(rows) == sorted([0, 1, 2] * 5)
    # Every row's first token before any row's second: the rows run together.
    assert sorted(rows[:3]) == [0, 1, 2]


def test_events_arrive_while_the_engine_generates(engine):
    """The first event is in hand long before the generation is over (lazily yielded):
    an adapter that answered after the whole generation would hand over all 48 at once."""
    request = engine.request(engine.encode("Hello"), 48)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.generate(request)]
    assert len(stamps) == 48
    # Prefill of 5 tokens plus one step, against 47 more decode steps.
    assert stamps[0] - start < 0.5 * (stamps[-1] - start)


def test_prompts_use_the_reference_tokenizer_without_special_tokens(engine):
    assert engine.encode("hi") == [ord("h"), ord("i")]  # dummy: byte-level, no BOS
    assert engine.profile.end_tokens  # the dummy's EOS ids, banned in every request
    bias = engine.request([1], 2).processors.logit_bias
    assert bias == {t: -math.inf for t in engine.profile.end_tokens}


def test_weight_bytes_count_every_parameter_once_and_the_untied_head_per_token(engine):
    model = engine.adapter.model
    if engine.name == "transformers":
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        embedding = model.get_input_embeddings().weight.numel() * 4
    else:
        params = dict(tree_flatten(model.parameters()))
        held = sum(v.nbytes for v in params.values())
        embedding = params["model.embed_tokens.weight"].nbytes
    assert engine.profile.weight_bytes == held
    # dummy has an untied head: a token reads one embedding row, but the whole head.
    assert engine.profile.weight_bytes_per_token == held - embedding


def test_versions_name_the_engine(engine):
    assert engine.name in engine.versions()


def test_transformers_threads_option_is_applied_per_call():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch

    default = torch.get_num_threads()
    one = open_timed("transformers:threads=1:name=t1", "dummy")
    two = open_timed("transformers:threads=2:name=t2", "dummy")
    try:
        tokens(one, "Hello", 2)
        assert torch.get_num_threads() == 1
        tokens(two, "Hello", 2)  # each engine sets its own count for its own calls
        assert torch.get_num_threads() == 2
    finally:
        one.close()
        two.close()
        torch.set_num_threads(default)


def test_specs_parse_names_slowdown_and_options():
    spec, name, slowdown = parse_bench_spec("synthetic:step_ms=3:slowdown=0.15:name=base")
    assert (name, slowdown) == ("base", 0.15)
    assert spec.target == "benchmarks.instruments:SyntheticEngine"
    assert spec.options == {"step_ms": "3"}  # the bench-only options are taken off
    slowed = open_timed("synthetic:step_ms=3:slowdown=0.15:name=base", "m")
    assert slowed.name == "base" and slowed.slowdown == 0.15
    assert slowed.adapter.step_s == 0.003
    assert TimedEngine.from_spec("mlx-lm", "dummy").name == "mlx-lm"
    assert split_specs("reference,transformers:threads=1,x=2,cmd:a b") == [
        "reference", "transformers:threads=1,x=2", "cmd:a b"]
    with pytest.raises(EngineUnavailable, match="unknown engine"):
        TimedEngine.from_spec("llama.cpp", "m")
    with pytest.raises(EngineUnavailable, match="no option threads"):
        open_timed("reference:threads=2", "dummy")
    with pytest.raises(EngineUnavailable, match="option slowdown='-1'"):
        TimedEngine.from_spec("synthetic:slowdown=-1", "m")
    with pytest.raises(EngineUnavailable, match="no option bogus"):
        open_timed("synthetic:bogus=1", "m")


def test_memory_probes_see_what_is_allocated_inside_them():
    with memory.TracemallocProbe() as probe:
        block = np.ones(10_000_000, dtype=np.uint8)
        del block
    assert 10_000_000 <= probe.peak_extra_bytes < 12_000_000

    with memory.MLXProbe() as probe:
        mx.eval(mx.ones((10_000_000,), dtype=mx.uint8) + 1)
    assert probe.peak_extra_bytes >= 10_000_000

    with memory.RSSProbe() as probe:
        block = np.ones(50_000_000, dtype=np.uint8)  # every page written
        del block
    if memory.Path("/proc/self/clear_refs").exists():
        assert 45_000_000 <= probe.peak_extra_bytes < 80_000_000
