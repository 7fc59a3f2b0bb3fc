"""The Llama family, and the blocks every other family reuses.

Llama (and SmolLM, Mistral): GQA attention with RoPE (incl. ``linear`` and
``llama3`` scaling), RMSNorm, SwiGLU MLP, tied or untied head, optional
attention bias and sliding window. Parameter names are those of Hugging Face /
mlx-lm checkpoints (``model.layers.N.self_attn.q_proj`` ...), so a standard
weight folder loads without renaming.

The other families (``qwen.py``, ``gemma.py``, ``phi3.py``, ``moe.py``) are
written as their differences from this one: each subclasses ``ModelArgs``,
``Attention`` or ``TransformerBlock`` and assembles a ``Model`` from the pieces.

The model never builds an attention mask itself: each layer's cache knows
which positions its queries may see (causal, sliding window, left padding in a
batch) and hands the mask over. Each layer says its own window
(``layer.self_attn.window``), so ``make_cache`` gives a model whose layers
alternate local and global attention the right cache for every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
from mlx import nn

from ..kv_cache import KVCache, RotatingKVCache

FULL, SLIDING = "full_attention", "sliding_attention"  # layer types, as transformers names them


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # FULL or SLIDING per layer; default: see below
    max_position_embeddings: int = 8192
    model_type: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is None:
            self.layer_types = self.default_layer_types()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    def default_layer_types(self) -> list[str]:
        """Mistral style: with a ``sliding_window`` every layer slides."""
        return [SLIDING if self.sliding_window else FULL] * self.num_hidden_layers

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None for global attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a Hugging Face ``config.json`` dict, ignoring unknown keys."""
        config = flatten_rope_parameters(config)
        known = {f.name for f in fields(cls)} - {"extra"}
        args = {k: v for k, v in config.items() if k in known}
        return cls(**args, extra={k: v for k, v in config.items() if k not in known})


def flatten_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Read transformers 5's ``rope_parameters`` as the classic ``rope_theta``/``rope_scaling``.

    Configs saved by transformers 5 hold one dict (``{"rope_type": ..., "rope_theta": ...}``);
    families with a RoPE per layer type (Gemma 3) read their nested form themselves.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return config
    config = dict(config)
    classic = {"rope_theta": rope["rope_theta"]}
    if rope.get("partial_rotary_factor") is not None:
        classic["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        classic["rope_scaling"] = rope
    for key, value in classic.items():
        if config.get(key) is None:  # the classic entry wins where both are given
            config[key] = value
    return config


# --- rotary position embedding --------------------------------------------------------------


@dataclass(frozen=True)
class RoPE:
    """Rotates the first ``dims`` dimensions of each head by position (the rest pass through)."""

    dims: int
    base: float | None
    scale: float = 1.0
    traditional: bool = False
    freqs: mx.array | None = None  # per-pair frequencies for scaled RoPE (then base is None)

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self.freqs,
        )


def make_rope(
    dims: int, base: float, scaling: dict[str, Any] | None = None, traditional: bool = False
) -> RoPE:
    """RoPE over ``dims`` dimensions with base ``base``, scaled as ``scaling`` (a config's
    ``rope_scaling``) says: ``linear`` divides positions by ``factor``; ``llama3`` stretches
    long wavelengths; anything else is refused rather than silently ignored."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return RoPE(dims, base, scale=1.0 / scaling["factor"], traditional=traditional)
    if kind == "llama3":
        return RoPE(
            dims, None, traditional=traditional, freqs=llama3_frequencies(dims, base, scaling)
        )
    if kind != "default":
        raise NotImplementedError(f"RoPE scaling {kind!r} is not supported")
    return RoPE(dims, base, traditional=traditional)


def llama3_frequencies(dims: int, base: float, scaling: dict[str, Any]) -> mx.array:
    """Llama 3.1's RoPE frequencies: long wavelengths stretched by ``factor``, smoothly."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    freqs = base ** (mx.arange(0, dims, 2) / dims)
    wavelens = 2 * math.pi * freqs
    freqs = mx.where(wavelens > low_freq_wavelen, freqs * factor, freqs)
    is_medium = (wavelens > high_freq_wavelen) & (wavelens < low_freq_wavelen)
    smooth = (old_context / wavelens - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = freqs / ((1 - smooth) / factor + smooth)
    return mx.where(is_medium, smoothed, freqs)


# --- attention ----------------------------------------------------------------------------


def attend(q, k, v, scale: float, mask: mx.array | None, softcap: float | None = None):
    """Softmax attention of q (B, H, L, D) over k, v (B, kv_heads, T, D); mask True = visible.

    With ``softcap`` the scores are squashed to ``softcap * tanh(scores / softcap)``
    before masking (Gemma 2); the fused kernel cannot do that, so it is spelled out,
    with the softmax in float32 as transformers does.
    """
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    repeats = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, repeats, axis=1), mx.repeat(v, repeats, axis=1)  # (B, H, T, D)
    scores = (q @ k.swapaxes(-1, -2)) * scale  # (B, H, L, T)
    scores = mx.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    return weights @ v


class Attention(nn.Module):
    """Grouped-query attention with RoPE; ``window`` is this layer's sliding window or None."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.window = args.window(layer)
        self.scale = self.head_dim**-0.5
        self.softcap: float | None = None
        self.rope = make_rope(
            self.head_dim, args.rope_theta, args.rope_scaling, args.rope_traditional
        )
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values, each (B, heads, L, head_dim), before RoPE."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return q, k, v

    def __call__(self, x: mx.array, mask: mx.array | None, cache) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.rope(q, cache.offset), self.rope(k, cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = attend(q, k, v, self.scale, mask, self.softcap)  # (B, H, L, head_dim)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``; SwiGLU with the default SiLU."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation=nn.silu):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.activation = activation

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


# --- the transformer ----------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``h = x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, args: ModelArgs, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def llama_block(args: ModelArgs, layer: int) -> TransformerBlock:
    mlp = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
    return TransformerBlock(args, Attention(args, layer), mlp)


class LlamaModel(nn.Module):
    """Embedding, blocks, final norm: hidden states (B, L, hidden_size)."""

    def __init__(self, embed_tokens: nn.Module, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm

    def embed(self, inputs: mx.array, input_embeddings: mx.array | None) -> mx.array:
        return input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)

    def __call__(self, inputs: mx.array, cache, input_embeddings: mx.array | None = None):
        h = self.embed(inputs, input_embeddings)
        for layer, layer_cache, mask in zip(self.layers, cache, layer_masks(cache, h.shape[1])):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


def llama_model(args: ModelArgs, block=llama_block) -> LlamaModel:
    """Llama's body, with ``block(args, layer_index)`` for each layer."""
    return LlamaModel(
        nn.Embedding(args.vocab_size, args.hidden_size),
        [block(args, i) for i in range(args.num_hidden_layers)],
        nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
    )


def layer_masks(cache: list, n: int) -> list[mx.array | None]:
    """Each layer's mask for ``n`` new positions, asked of its own cache before any update.

    All layers have seen the same positions, so caches of one kind give one mask:
    it is computed once per kind (global, or one sliding window).
    """

    def kind(c) -> tuple:
        return type(c), getattr(c, "max_size", None), getattr(c, "keep", None)

    masks = {}
    for c in cache:
        if kind(c) not in masks:
            masks[kind(c)] = c.make_mask(n)
    return [masks[kind(c)] for c in cache]


class Model(nn.Module):
    """Causal LM: a ``LlamaModel`` (Llama's unless another is given) plus the output head,
    tied to the embedding or not."""

    def __init__(self, args: ModelArgs, model: LlamaModel | None = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = model if model is not None else llama_model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None):
        """Logits (B, L, vocab_size). Without ``cache`` a fresh one is used, so the masks
        (causal, sliding windows) are always those of the model's own caches."""
        cache = cache if cache is not None else self.make_cache()
        h = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def make_cache(self) -> list:
        """One cache per layer: a sliding window where the layer has one, else unbounded."""
        windows = (layer.self_attn.window for layer in self.layers)
        return [RotatingKVCache(w) if w else KVCache() for w in windows]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint entries that are not parameters of this model."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
