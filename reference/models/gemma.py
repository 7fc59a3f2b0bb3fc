"""Gemma 2 and Gemma 3 (text only), as transformers 5 implements them.

What differs from Llama:

* RMSNorm scales by ``1 + weight`` (checkpoints store the offset from 1), in float32;
* the embedding is multiplied by ``sqrt(hidden_size)``, rounded to the embedding's
  dtype; the tied head uses the unscaled rows;
* the MLP is gated with GELU (tanh approximation, ``gelu_pytorch_tanh``);
* four norms per layer: before and after attention, before and after the MLP,
  each output normed before it joins the residual stream;
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim``;
* local (sliding window) and global layers alternate: every
  ``sliding_window_pattern``-th layer is global (or as ``layer_types`` says);
* Gemma 2 soft-caps attention scores (``attn_logit_softcapping``) and the final
  logits (``final_logit_softcapping``): ``cap * tanh(x / cap)``;
* Gemma 3 norms each head's queries and keys (as Qwen3, with ``1 + weight``),
  gives its local layers their own unscaled RoPE base (``rope_local_base_freq``),
  and by default caps nothing.

Input embeddings given to the model are raw embedding rows and get scaled like
token embeddings, as in mlx-lm (transformers 5 takes its ``inputs_embeds`` as
already scaled): ``model.model.embed_tokens(ids)`` passed as ``input_embeddings``
gives the same logits as ``ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn

from . import llama
from .llama import FULL, MLP, SLIDING, make_rope

# transformers' defaults where the two versions differ (configs often omit them).
DEFAULTS = {
    "gemma2": {
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window_pattern": 2,
    },
    "gemma3_text": {
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
}
ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu": nn.gelu}


@dataclass
class ModelArgs(llama.ModelArgs):
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window_pattern: int = 2  # every pattern-th layer is global
    rope_local_base_freq: float | None = None  # Gemma 3: RoPE base of the local layers
    rms_norm_eps: float = 1e-6

    def default_layer_types(self) -> list[str]:
        pattern = self.sliding_window_pattern
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(self.num_hidden_layers)]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        config = DEFAULTS.get(config.get("model_type"), {}) | per_layer_type_rope(config)
        return super().from_config(config)


def per_layer_type_rope(config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's transformers 5 ``rope_parameters`` (one dict per layer type) as the classic
    ``rope_theta``, ``rope_scaling`` (global layers) and ``rope_local_base_freq``."""
    rope = config.get("rope_parameters") or {}
    if FULL not in rope:
        return config
    full, local = rope[FULL], rope.get(SLIDING) or {}
    config = {k: v for k, v in config.items() if k != "rope_parameters"}
    config["rope_theta"] = full["rope_theta"]
    if full.get("rope_type", "default") != "default":
        config["rope_scaling"] = full
    if "rope_theta" in local:
        config["rope_local_base_freq"] = local["rope_theta"]
    return config


class RMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight``, computed in float32 whatever the input dtype."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.scale = args.query_pre_attn_scalar**-0.5
        self.softcap = args.attn_logit_softcapping
        if self.window and args.rope_local_base_freq:
            self.rope = make_rope(self.head_dim, args.rope_local_base_freq)
        self.qk_norm = args.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = super().project(x)  # (B, heads, L, head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class TransformerBlock(nn.Module):
    """Norms before and after each sub-layer; the residual adds the normed output."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        activation = ACTIVATIONS[args.hidden_activation]
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, activation=activation)
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache) -> mx.array:
        attended = self.self_attn(self.input_layernorm(x), mask, cache)
        h = x + self.post_attention_layernorm(attended)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(llama.LlamaModel):
    def embed(self, inputs: mx.array, input_embeddings: mx.array | None) -> mx.array:
        h = super().embed(inputs, input_embeddings)  # (B, L, hidden_size)
        return h * mx.array(math.sqrt(h.shape[-1]), dtype=h.dtype)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        body = GemmaModel(
            nn.Embedding(args.vocab_size, args.hidden_size),
            [TransformerBlock(args, i) for i in range(args.num_hidden_layers)],
            RMSNorm(args.hidden_size, args.rms_norm_eps),
        )
        super().__init__(args, body)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None):
        logits = super().__call__(inputs, cache, input_embeddings)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap
