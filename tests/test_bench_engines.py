"""Timing adapters (benchmarks/engines.py) on the real engines with the ``dummy`` model.

What an adapter must get right for its timings to mean anything: exactly the asked
number of tokens (end-of-sequence suppressed), one token per sequence per batched
step, draft tokens flagged, and the weight bytes that the roofline divides by.
"""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from benchmarks import memory
from benchmarks.engines import (
    MLXAPIEngine,
    Slowdown,
    SyntheticEngine,
    TransformersEngine,
    _first_layers,
    make_engine,
    parse_spec,
)

# For ``dummy``, greedy decoding of this prompt emits an EOS id as its second token.
EOS_PROMPT = " nobody else"
KINDS = ["reference", "mlx-lm", "transformers"]
NEEDS = {"mlx-lm": "mlx_lm", "transformers": "torch"}


@pytest.fixture(scope="module", params=KINDS)
def engine(request):
    module = NEEDS.get(request.param)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{request.param} is not installed: pip install 'lmconform[peers]'")
    loaded = make_engine(request.param, "dummy")
    loaded.load()
    return loaded


def collect(engine, prompt, max_tokens, **kwargs) -> list[bool]:
    flags = []
    engine.generate(engine.encode(prompt), max_tokens, flags.append, **kwargs)
    return flags


def test_generation_length_is_exact_even_where_the_model_would_stop(engine):
    # Without suppression this prompt ends after 1 token (the EOS is its 2nd token).
    assert len(collect(engine, EOS_PROMPT, 24)) == 24
    assert len(collect(engine, "Hello, world!", 1)) == 1


def test_speculative_generation_flags_draft_tokens(engine):
    flags = collect(engine, "The quick brown fox", 24, num_draft_tokens=3)
    assert len(flags) == 24
    assert any(flags) and not all(flags)  # some tokens accepted from the draft, not all


def test_batched_steps_yield_one_token_per_sequence(engine):
    if not engine.supports("batch"):
        pytest.skip(f"{engine.name} has no batched generation")
    prompts = [engine.encode(p)[:6] for p in ("Hello, world!", EOS_PROMPT * 2, "Once upon")]
    steps = []
    engine.generate_batch(prompts, 5, steps.append)
    assert steps == [3] * 5


def test_encode_skips_special_tokens(engine):
    assert engine.encode("hi") == [ord("h"), ord("i")]  # dummy: byte-level, no BOS


def test_weight_bytes_count_every_parameter_once_and_the_untied_head_per_token(engine):
    if isinstance(engine, MLXAPIEngine):
        params = dict(tree_flatten(engine.model.parameters()))
        held = sum(v.nbytes for v in params.values())
        embedding = params["model.embed_tokens.weight"].nbytes
    else:
        held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        embedding = engine.model.get_input_embeddings().weight.numel() * 4
    assert engine.weight_bytes() == held
    # dummy has an untied head: a token reads one embedding row, but the whole head.
    assert engine.weight_bytes_per_token() == held - embedding


def test_versions_name_the_engine(engine):
    assert engine.name in engine.versions()


def test_self_draft_keeps_the_first_layers_and_shares_weights():
    engine = make_engine("reference", "dummy")
    engine.load()
    assert isinstance(engine, MLXAPIEngine)
    model = engine.model
    draft = _first_layers(model, 1)
    assert len(draft.layers) == 1 and len(model.layers) == 2  # the original is untouched
    assert draft.layers[0] is model.layers[0]
    assert draft.model.embed_tokens is model.model.embed_tokens
    tokens = mx.array([engine.encode("Hello")])
    assert draft(tokens).shape == model(tokens).shape


def test_transformers_threads_option_is_applied_per_call():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch

    default = torch.get_num_threads()
    one = make_engine("transformers:threads=1", "dummy")
    plain = make_engine("transformers", "dummy")
    assert isinstance(one, TransformersEngine) and one.threads == 1
    one.load()
    plain.load()
    try:
        collect(one, "Hello", 2)
        assert torch.get_num_threads() == 1 and one.settings()["threads"] == 1
        collect(plain, "Hello", 2)  # the other engine gets the process default back
        assert torch.get_num_threads() == default == plain.settings()["threads"]
    finally:
        torch.set_num_threads(default)


def test_specs_parse_names_slowdown_and_options():
    assert parse_spec("synthetic:step_ms=2:name=x") == ("synthetic", {"step_ms": "2", "name": "x"})
    slowed = make_engine("synthetic:step_ms=3:slowdown=0.15:name=base", "m")
    assert isinstance(slowed, Slowdown) and slowed.fraction == 0.15 and slowed.name == "base"
    assert isinstance(slowed.inner, SyntheticEngine) and slowed.inner.step_s == 0.003
    assert make_engine("mlx-lm", "dummy").name == "mlx-lm"
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("llama.cpp", "m")
    with pytest.raises(ValueError, match="key=value"):
        make_engine("synthetic:oops", "m")
    with pytest.raises(ValueError, match="takes no options"):
        make_engine("reference:threads=2", "m")
    with pytest.raises(ValueError, match="slowdown fraction"):
        make_engine("synthetic:slowdown=-1", "m")


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
