"""The reference's fast path (``reference/blas.py``, ``reference/fast_path.py``).

Two promises: MLX's float32 products really run in OpenBLAS (through the shim,
which is invisible when it fails: results stay right, only slow), and the fast
path answers every catalogue case as the exact path does: the same greedy
tokens, logprobs within the profile's tolerance.

The built-in dummy models are float32, which the fast path leaves alone; the
comparison runs on the dummy quantized to 4 bits (groups of 32, smollm2-135m's
layout), where the exact path multiplies by quantized weights and the fast path
by their float32 de-quantization.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

import reference
from conformance.catalogue import build_request, load_cases, select_cases
from conformance.oracle import ReferenceOracle
from conformance.profiles import profile_for_model
from engines.adapters.reference import ReferenceEngine
from engines.models import ModelSource
from reference import blas
from reference.fast_path import dequantize_model

GROUP_SIZE, BITS = 32, 4


def test_mlx_float32_products_are_served_by_openblas():
    installed = blas.install()
    assert installed.optimized, installed.reason
    maps = Path("/proc/self/maps").read_text()
    assert installed.shim._name in maps and "libscipy_openblas" in maps
    a, b = np.random.default_rng(0).standard_normal((2, 48, 48), dtype=np.float32)
    before = installed.calls()
    product = np.array(mx.array(a) @ mx.array(b))
    assert installed.calls() == before + 1  # MLX's cblas_sgemm is bound to the shim
    np.testing.assert_allclose(product, a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_one_row_products_equal_numpy_in_every_layout(transpose_a, transpose_b):
    """One-row products take the shim's sgemv branch; each stored layout maps differently."""
    rng = np.random.default_rng(1)
    row = rng.standard_normal((1, 40), dtype=np.float32)
    matrix = rng.standard_normal((40, 24), dtype=np.float32)
    x = mx.array(row.T.copy()).T if transpose_a else mx.array(row)
    w = mx.array(matrix.T.copy()).T if transpose_b else mx.array(matrix)
    before = blas.install().calls()
    product = np.array(x @ w)
    assert blas.install().calls() == before + 1
    np.testing.assert_allclose(product, row @ matrix, rtol=1e-5, atol=1e-5)


def test_one_row_product_with_alpha_and_beta():
    rng = np.random.default_rng(2)
    row, matrix, c = (rng.standard_normal(s, dtype=np.float32) for s in [(1, 40), (40, 24), (24,)])
    product = mx.addmm(mx.array(c), mx.array(row), mx.array(matrix), alpha=0.5, beta=2.0)
    np.testing.assert_allclose(np.array(product), 2 * c + 0.5 * row @ matrix, rtol=1e-5, atol=1e-5)


def quantized(model: nn.Module) -> nn.Module:
    nn.quantize(model, group_size=GROUP_SIZE, bits=BITS)
    mx.eval(model.parameters())
    return model


class QuantizedDummy(ReferenceEngine):
    """The reference on the dummy quantized to 4 bits; ``fast`` de-quantizes it again."""

    fast = False

    def load(self, source):
        model, tokenizer = reference.load("dummy", fast=False)
        model = quantized(model)
        if self.fast:
            assert dequantize_model(model) == 16  # 2 layers x 7, embedding, head
        return model, tokenizer


class FastQuantizedDummy(QuantizedDummy):
    fast = True


def test_dequantized_layers_compute_what_the_quantized_ones_do(dummy):
    _, tokenizer = dummy
    exact = QuantizedDummy(ModelSource("dummy", "builtin")).model
    fast = FastQuantizedDummy(ModelSource("dummy", "builtin")).model
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fast.named_modules())
    ids = mx.array([tokenizer.encode("The fast path, token by token.")])
    np.testing.assert_allclose(np.array(fast(ids)), np.array(exact(ids)), rtol=0, atol=1e-4)


class HeadWithoutBiases(FastQuantizedDummy):
    """A broken fast path: the head de-quantized as ``scale * q``, its biases dropped."""

    def load(self, source):
        model, tokenizer = super().load(source)
        head = quantized(reference.load("dummy", fast=False)[0]).lm_head
        model.lm_head.weight = mx.dequantize(
            head.weight, head.scales, mx.zeros_like(head.biases), GROUP_SIZE, BITS
        )
        return model, tokenizer


def disagreements(engine: ReferenceEngine, exact: ReferenceOracle, cases) -> list[str]:
    """Where ``engine`` answers a case's request, made greedy, otherwise than ``exact``
    does: tokens, finish reason, chosen and top logprobs (within the profile).

    Sampled requests are asked greedily: the distribution cases draw without a
    seed, and what a draw should match is the distribution, judged elsewhere.
    """
    profile = exact.default_profile()
    other = ReferenceOracle("dummy", engine=engine)
    found = []
    for case in cases:
        request = build_request(case.request, exact)
        request = replace(request, sampler=replace(request.sampler, temp=0.0))
        want, got = exact.answer(request), other.answer(request)
        if got.tokens != want.tokens or got.finish_reason != want.finish_reason:
            found.append(f"{case.id}: tokens {got.tokens} != {want.tokens}")
            continue
        for step, (w, g) in enumerate(zip(want.events, got.events, strict=True)):
            pairs = [(w.logprob, g.logprob)] + [
                (lw, lg) for (_, lw), (_, lg) in zip(w.top_logprobs, g.top_logprobs, strict=True)
            ]
            if not all(profile.logprobs_agree(lw, lg) for lw, lg in pairs):
                found.append(f"{case.id}: logprobs differ at step {step}")
                break
    return found


@pytest.fixture(scope="module")
def exact_oracle():
    return ReferenceOracle("dummy", engine=QuantizedDummy(ModelSource("dummy", "builtin")))


@pytest.fixture(scope="module")
def dummy_cases():
    cases = [c for c in select_cases(load_cases(), "dummy") if c.kind != "score"]
    assert len(cases) >= 70
    return cases


def test_fast_path_answers_every_catalogue_case_as_the_exact_path(exact_oracle, dummy_cases):
    fast = FastQuantizedDummy(ModelSource("dummy", "builtin"))
    assert disagreements(fast, exact_oracle, dummy_cases) == []


def test_a_broken_fast_path_disagrees(exact_oracle, dummy_cases):
    broken = HeadWithoutBiases(ModelSource("dummy", "builtin"))
    assert len(disagreements(broken, exact_oracle, dummy_cases)) > len(dummy_cases) // 2


@pytest.mark.smollm
def test_fast_path_on_smollm2_decodes_as_the_exact_path(smollm):
    """The real quantized model, a short chat prompt, a few tokens: same greedy tokens,
    every logprob of the vocabulary within the q4 profile's tolerance."""
    fast, tokenizer = smollm
    exact, _ = reference.load("smollm2-135m", fast=False)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in exact.named_modules())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fast.named_modules())
    prompt = mx.array(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
        )
    )
    tolerance = np.vectorize(profile_for_model("smollm2-135m").logprob_tolerance)
    steps = zip(
        reference.generate_step(prompt, fast, max_tokens=6),
        reference.generate_step(prompt, exact, max_tokens=6),
        strict=True,
    )
    for (fast_token, fast_logprobs), (exact_token, exact_logprobs) in steps:
        assert fast_token == exact_token
        expected = np.array(exact_logprobs)
        assert np.all(np.abs(np.array(fast_logprobs) - expected) <= tolerance(expected))


@pytest.mark.parametrize(
    ("code", "env", "reason"),
    [
        ("import mlx.core; import reference", {}, "mlx.core was imported before reference"),
        ("import reference", {"LMCONFORM_BLAS": "mlx"}, "LMCONFORM_BLAS=mlx"),
        ("import reference", {"LMCONFORM_BLAS_THREADS": "two"}, "LMCONFORM_BLAS_THREADS"),
    ],
)
def test_without_openblas_one_notice_and_the_exact_path(code, env, reason):
    """Where OpenBLAS cannot be put under MLX: one line on stderr saying why, and
    MLX's own BLAS serves the products, still correctly."""
    script = (
        f"{code}\n"
        "import mlx.core as mx\n"
        "from reference import blas\n"
        "assert not blas.install().optimized and blas.install().calls() == 0\n"
        "assert mx.array_equal(mx.eye(3) @ mx.arange(9.0).reshape(3, 3), mx.arange(9.0).reshape(3, 3))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=os.environ | env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and reason in lines[0] and "reference BLAS" in lines[0]


@pytest.mark.parametrize(
    "module",
    [
        "engines.adapters.reference",
        "engines.adapters.mlx_style",
        "engines.adapters.mlx_lm",
        "conformance.examples.jsonl_engine",
        "conformance.pytest_plugin",
        "lmconform.cli",
    ],
)
def test_openblas_serves_a_process_whichever_module_it_imports_first(module):
    """A process whose first import is an adapter, the plugin or the CLI still gets the
    fast path: mlx.core imported before the reference would leave MLX's slow BLAS."""
    script = (
        f"import {module}\n"
        "from reference import blas\n"
        "assert blas.install().optimized, blas.install().reason\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
