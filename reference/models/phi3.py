"""Phi-3 (and Phi-4-mini): Llama with fused projections and partial RoPE.

* ``qkv_proj`` holds the query, key and value projections stacked by rows, in
  that order; ``gate_up_proj`` holds the MLP's gate then up projections.
* ``partial_rotary_factor`` (Phi-4-mini: 0.75) rotates only the first
  ``head_dim * factor`` dimensions of each head; the rest pass through
  unrotated, as in transformers' ``Phi3`` and mlx-lm.
* A ``sliding_window`` applies to every layer, as transformers does (mlx-lm 0.32.2
  ignores it: Phi-3-mini's 2047 makes the two differ on prompts over 2047 tokens).

Not supported: ``longrope`` / ``su`` RoPE scaling (the 128k-context Phi-3
variants); loading such a config raises ``NotImplementedError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from . import llama
from .llama import TransformerBlock, make_rope


@dataclass
class ModelArgs(llama.ModelArgs):
    partial_rotary_factor: float = 1.0


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        del self.q_proj, self.k_proj, self.v_proj  # one fused projection instead
        self.qkv_proj = nn.Linear(
            args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False
        )
        rotated = int(self.head_dim * args.partial_rotary_factor)
        self.rope = make_rope(rotated, args.rope_theta, args.rope_scaling, args.rope_traditional)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_end, k_end], axis=-1)
        return tuple(
            t.reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v)
        )  # each (B, heads, L, head_dim)


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused: ``down(silu(gate) * up)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


def phi3_block(args: ModelArgs, layer: int) -> TransformerBlock:
    return TransformerBlock(
        args, Attention(args, layer), MLP(args.hidden_size, args.intermediate_size)
    )


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, llama.llama_model(args, phi3_block))
