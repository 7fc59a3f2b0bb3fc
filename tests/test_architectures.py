"""Every model family of the reference equals transformers (and mlx-lm) on its tiny dummy.

Each family's ``dummy-*`` model is exported to a Hugging Face folder and loaded
by transformers (float32, eager attention) and, where it supports the family,
mlx-lm. Over a prompt of ``len(PROMPT_IDS)`` tokens (over four times the
16-token sliding windows) the reference's logits must equal theirs within
``ATOL``, both from one full prefill and decoding token by token through the
KV caches (a saved and reloaded prompt cache included).

The cross-check has teeth: ``BUGS`` breaks one thing at a time in a reference
model (a norm offset dropped, a soft-cap skipped, a window on the wrong
layers, MoE gates not renormalised, ...) and each broken model must differ
from transformers by far more than ``ATOL``.

The same families also go through batch generation, speculative decoding and
the greedy-margin check of the built-in models.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from reference import (
    BatchGenerator,
    generate_step,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    speculative_generate_step,
    stream_generate,
)
from reference.dummy import DUMMY_MODELS, STANDARD_PROMPTS
from reference.export import export_model
from reference.kv_cache import RotatingKVCache
from reference.loading import load
from reference.models import FAMILIES, gemma, llama, phi3

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")

ATOL = 1e-4  # float32 logits of magnitude up to about 45
BUG_MIN_DIFF = 1e-2  # a broken variant must differ by at least 100 * ATOL

# One tiny model per family (model_type).
FAMILY_MODELS = {
    "llama": "dummy",
    "qwen2": "dummy-qwen2",
    "qwen3": "dummy-qwen3",
    "gemma2": "dummy-gemma",
    "gemma3_text": "dummy-gemma3",
    "phi3": "dummy-phi3",
    "qwen3_moe": "dummy-moe",
    "qwen2_moe": "dummy-qwen2-moe",
    "mixtral": "dummy-mixtral",
}
MODELS = list(FAMILY_MODELS.values())
WINDOW = 16  # the sliding window of dummy-qwen2, dummy-gemma and dummy-gemma3
PROMPT = "Once upon a time, in a café by the sea, a quick brown fox counted: 1, 2, 3, 4, 5!"
PROMPT_IDS = list(PROMPT.encode("utf-8"))  # byte-level vocabulary: token id = byte
DECODE_FROM = len(PROMPT_IDS) - 24  # decoding runs token by token from here

# mlx-lm 0.32.2 attends globally in every layer of qwen2 and gemma2 (it has no
# sliding window for them), so it is compared with the reference without windows.
MLX_LM_WITHOUT_WINDOW = {
    "dummy-qwen2": {"use_sliding_window": False},
    "dummy-gemma": {"sliding_window": 4096},
}


def test_every_family_has_a_dummy_model():
    assert set(FAMILY_MODELS) == set(FAMILIES) - {"mistral"}  # mistral: Llama with a window
    assert set(MODELS) <= set(DUMMY_MODELS)
    assert len(PROMPT_IDS) >= 4 * WINDOW


# -- helpers -------------------------------------------------------------------------------
def logits(model, ids: list[int], cache=None) -> np.ndarray:
    return np.array(model(mx.array([ids]), cache=cache)[0])


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def decode(model, ids: list[int], tmp_path) -> np.ndarray:
    """Logits of ``ids[DECODE_FROM:]``, one token at a time, after a prefill of the rest in
    chunks of 5 and a save/load of the prompt cache."""
    cache = make_prompt_cache(model)
    for start in range(0, DECODE_FROM, 5):
        model(mx.array([ids[start : min(start + 5, DECODE_FROM)]]), cache=cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    cache = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    return np.concatenate([logits(model, [token], cache) for token in ids[DECODE_FROM:]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)`` -> the model's Hugging Face folder, written once."""
    folders = {}

    def get(name: str):
        if name not in folders:
            folders[name] = export_model(name, tmp_path_factory.mktemp("arch") / name)
        return folders[name]

    return get


@pytest.fixture(scope="module")
def transformers_runs(exported):
    """``transformers_runs(name)`` -> (full-prefill logits, logits decoded token by token
    from DECODE_FROM on)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    runs = {}

    def get(name: str):
        if name not in runs:
            model = AutoModelForCausalLM.from_pretrained(
                str(exported(name)), dtype=torch.float32, attn_implementation="eager"
            )
            with torch.no_grad():
                full = model(torch.tensor([PROMPT_IDS])).logits[0].numpy()
                out = model(torch.tensor([PROMPT_IDS[:DECODE_FROM]]), use_cache=True)
                steps = []
                for token in PROMPT_IDS[DECODE_FROM:]:
                    past = out.past_key_values
                    out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                    steps.append(out.logits[0, -1].numpy())
            runs[name] = (full, np.stack(steps))
        return runs[name]

    return get


# -- equal to transformers and mlx-lm ------------------------------------------------------
@pytest.mark.peer
@pytest.mark.parametrize("name", MODELS)
def test_prefill_equals_transformers(name, loaded_models, transformers_runs):
    model, _ = loaded_models(name)
    full, _ = transformers_runs(name)
    assert max_diff(logits(model, PROMPT_IDS), full) <= ATOL


@pytest.mark.peer
@pytest.mark.parametrize("name", MODELS)
def test_cached_decode_equals_transformers(name, loaded_models, transformers_runs, tmp_path):
    model, _ = loaded_models(name)
    full, steps = transformers_runs(name)
    assert max_diff(steps, full[DECODE_FROM:]) <= ATOL  # transformers agrees with itself
    assert max_diff(decode(model, PROMPT_IDS, tmp_path), steps) <= ATOL


@pytest.mark.peer
@pytest.mark.parametrize("name", MODELS)
def test_mlx_lm_equals_reference(name, loaded_models, exported):
    mlx_lm = pytest.importorskip("mlx_lm")
    theirs, _ = mlx_lm.load(str(exported(name)))
    if name in MLX_LM_WITHOUT_WINDOW:
        model, _ = load(name, model_config=MLX_LM_WITHOUT_WINDOW[name])
        windowed, _ = loaded_models(name)
        # The windows matter: past them, the reference with windows differs from mlx-lm.
        assert max_diff(logits(theirs, PROMPT_IDS), logits(windowed, PROMPT_IDS)) > BUG_MIN_DIFF
    else:
        model, _ = loaded_models(name)
    assert max_diff(logits(theirs, PROMPT_IDS), logits(model, PROMPT_IDS)) <= ATOL


# -- the cross-check catches classic bugs --------------------------------------------------
def broken_norm_offset(model, monkeypatch):
    """Gemma's RMSNorm scaled by ``weight`` instead of ``1 + weight``."""

    def call(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)

    monkeypatch.setattr(gemma.RMSNorm, "__call__", call)


def broken_embedding_scale(model, monkeypatch):
    """Gemma's embedding not multiplied by sqrt(hidden_size)."""
    monkeypatch.setattr(gemma.GemmaModel, "embed", llama.LlamaModel.embed)


def broken_attention_softcap(model, monkeypatch):
    for layer in model.layers:
        layer.self_attn.softcap = None


def broken_final_softcap(model, monkeypatch):
    model.args = replace(model.args, final_logit_softcapping=None)


def broken_query_scale(model, monkeypatch):
    """Scores scaled by head_dim ** -0.5 instead of query_pre_attn_scalar ** -0.5."""
    for layer in model.layers:
        layer.self_attn.scale = layer.self_attn.head_dim**-0.5


def broken_window_layers(model, monkeypatch):
    """The local window given to the other layers (global ones slide, local ones do not)."""
    windows = [layer.self_attn.window for layer in model.layers]
    for layer, window in zip(model.layers, windows[1:] + windows[:1]):
        layer.self_attn.window = window


def broken_local_rope_base(model, monkeypatch):
    """Gemma 3's local layers rotating with the global RoPE base."""
    for layer in model.layers:
        layer.self_attn.rope = model.layers[-1].self_attn.rope


def broken_qk_norm(model, monkeypatch):
    """Qwen3's per-head query/key norms skipped."""
    monkeypatch.setattr(type(model.layers[0].self_attn), "project", llama.Attention.project)


def broken_bias(model, monkeypatch):
    """Qwen2's query/key/value biases dropped."""
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias = mx.zeros_like(proj.bias)


def broken_full_rotary(model, monkeypatch):
    """Phi-3 rotating every dimension instead of partial_rotary_factor of them."""
    for layer in model.layers:
        attention = layer.self_attn
        attention.rope = replace(attention.rope, dims=attention.head_dim)


def broken_gate_up_order(model, monkeypatch):
    """Phi-3's fused gate_up_proj split as (up, gate) instead of (gate, up)."""

    def call(self, x):
        up, gate = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)

    monkeypatch.setattr(phi3.MLP, "__call__", call)


def flip_gate_renormalisation(model, monkeypatch):
    """MoE gates renormalised when the model says not to, or not when it says to."""
    for layer in model.layers:
        moe = layer.block_sparse_moe if "block_sparse_moe" in layer else layer.mlp
        moe.normalize = not moe.normalize


BUGS = [
    ("dummy-gemma", broken_norm_offset),
    ("dummy-gemma", broken_embedding_scale),
    ("dummy-gemma", broken_attention_softcap),
    ("dummy-gemma", broken_final_softcap),
    ("dummy-gemma", broken_query_scale),
    ("dummy-gemma", broken_window_layers),
    ("dummy-gemma3", broken_norm_offset),
    ("dummy-gemma3", broken_window_layers),
    ("dummy-gemma3", broken_local_rope_base),
    ("dummy-qwen3", broken_qk_norm),
    ("dummy-qwen2", broken_bias),
    ("dummy-qwen2", broken_window_layers),
    ("dummy-phi3", broken_full_rotary),
    ("dummy-phi3", broken_gate_up_order),
    ("dummy-moe", flip_gate_renormalisation),
    ("dummy-qwen2-moe", flip_gate_renormalisation),
    ("dummy-mixtral", flip_gate_renormalisation),
]


@pytest.mark.peer
@pytest.mark.parametrize(
    ("name", "bug"), BUGS, ids=[f"{name}-{bug.__name__}" for name, bug in BUGS]
)
def test_cross_check_catches(name, bug, transformers_runs, monkeypatch):
    model, _ = load(name)  # a fresh model: the bug must not leak into other tests
    full, _ = transformers_runs(name)
    assert max_diff(logits(model, PROMPT_IDS), full) <= ATOL
    bug(model, monkeypatch)
    assert max_diff(logits(model, PROMPT_IDS), full) > BUG_MIN_DIFF


# -- generation features ----------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_greedy_paths_are_well_conditioned(name, loaded_models):
    """Median top-1/top-2 margin along the greedy paths of STANDARD_PROMPTS >= 0.5 nats."""
    model, tokenizer = loaded_models(name)
    margins = []
    for prompt in STANDARD_PROMPTS:
        for _, logprobs in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=12):
            top2 = mx.topk(logprobs, 2)
            margins.append(abs(top2[0] - top2[1]).item())
    assert statistics.median(margins) >= 0.5


@pytest.mark.parametrize("name", MODELS)
def test_batch_equals_single(name, loaded_models):
    """Prompts shorter and longer than the windows, prefilled in chunks, decoded together."""
    model, tokenizer = loaded_models(name)
    prompts = [PROMPT_IDS[:n] for n in (3, 20, 41, len(PROMPT_IDS))]
    generator = BatchGenerator(
        model,
        max_tokens=10,
        stop_tokens=sorted(tokenizer.eos_token_ids),
        prefill_step_size=7,
        prefill_batch_size=3,
    )
    uids = generator.insert(prompts)
    batched = {uid: [] for uid in uids}
    while responses := generator.next_generated():
        for r in responses:
            batched[r.uid].append((r.token, r.logprobs))
    for uid, prompt in zip(uids, prompts):
        single = list(stream_generate(model, tokenizer, prompt, max_tokens=10))
        assert [t for t, _ in batched[uid]] == [r.token for r in single]
        for (_, a), r in zip(batched[uid], single):
            assert mx.abs(a - r.logprobs).max().item() <= ATOL


@pytest.mark.parametrize("name", MODELS)
def test_speculative_equals_greedy(name, loaded_models):
    """With ``dummy-draft`` proposing (many rejections), past the windows."""
    model, _ = loaded_models(name)
    draft, _ = loaded_models("dummy-draft")
    prompt = mx.array(PROMPT_IDS[:30])
    greedy = [t for t, _ in generate_step(prompt, model, max_tokens=24)]
    steps = speculative_generate_step(prompt, model, draft, max_tokens=24, num_draft_tokens=3)
    assert [t for t, _, _ in steps] == greedy


# -- loading and caches ----------------------------------------------------------------------
def test_unknown_model_type_is_a_clear_error(tmp_path, exported):
    folder = shutil.copytree(exported("dummy-qwen3"), tmp_path / "qwen9")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "qwen9"}))
    with pytest.raises(ValueError, match="'qwen9'.*supported: .*gemma2.*qwen3"):
        load(str(folder))


@pytest.mark.peer
def test_reads_configs_saved_by_transformers_5(exported, tmp_path):
    """transformers 5 writes RoPE settings as ``rope_parameters``, per layer type for Gemma 3."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    classic = shutil.copytree(exported("dummy-gemma3"), tmp_path / "classic")
    config = json.loads((classic / "config.json").read_text())
    config |= {"rope_theta": 50_000.0, "rope_local_base_freq": 500.0}
    (classic / "config.json").write_text(json.dumps(config))
    saved = tmp_path / "saved"
    model = AutoModelForCausalLM.from_pretrained(str(classic), dtype=torch.float32)
    model.save_pretrained(str(saved))
    for tokenizer_file in classic.glob("*token*"):
        shutil.copy(tokenizer_file, saved)
    written = json.loads((saved / "config.json").read_text())
    assert "rope_theta" not in written and "rope_local_base_freq" not in written

    theirs = logits(load(str(saved))[0], PROMPT_IDS)
    assert max_diff(theirs, logits(load(str(classic))[0], PROMPT_IDS)) <= ATOL
    assert max_diff(theirs, logits(load("dummy-gemma3")[0], PROMPT_IDS)) > BUG_MIN_DIFF


def test_family_is_chosen_by_model_type(loaded_models):
    for model_type, name in FAMILY_MODELS.items():
        model, _ = loaded_models(name)
        assert model.model_type == model_type
        assert type(model).__module__ == FAMILIES[model_type].__name__


def test_layers_get_their_own_caches(loaded_models):
    model, _ = loaded_models("dummy-gemma3")
    kinds = [(type(c).__name__, getattr(c, "max_size", None)) for c in model.make_cache()]
    assert kinds == [("RotatingKVCache", WINDOW)] * 2 + [("KVCache", None)]


def test_rotating_cache_trims_exactly_within_its_slack():
    """Speculative decoding takes back rejected positions after the window began to evict."""

    def position(p: int) -> mx.array:
        return mx.full((1, 1, 1, 1), float(p))

    def filled(slack: int) -> RotatingKVCache:
        cache = RotatingKVCache(max_size=4, slack=slack)
        for p in range(10):
            cache.update_and_fetch(position(p), position(p))
        return cache

    cache = filled(slack=2)  # stores 5..9: the window's 3 plus 2 of slack
    assert cache.trim(2) == 2 and cache.offset == 8
    assert cache.make_mask(1) is None  # position 8 sees all that is left: 5, 6, 7
    keys, _ = cache.update_and_fetch(position(8), position(8))
    assert keys[0, 0, :, 0].tolist() == [5.0, 6.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="cannot trim"):
        filled(slack=0).trim(1)  # position 6 was evicted: refused rather than wrong
