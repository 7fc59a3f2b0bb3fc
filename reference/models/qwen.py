"""Qwen2 and Qwen3: Llama with two changes to attention.

* Qwen2: biases on the query, key and value projections (never on the output),
  whatever the config says, as in transformers.
* Qwen3: no biases (unless ``attention_bias``), but an RMSNorm over each head's
  query and key vectors, applied before RoPE.

Both slide a window only when ``use_sliding_window`` is set, and then only in
the layers from ``max_window_layers`` on (transformers' rule; mlx-lm ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
from mlx import nn

from . import llama
from .llama import FULL, MLP, SLIDING, TransformerBlock


@dataclass
class ModelArgs(llama.ModelArgs):
    use_sliding_window: bool = False
    max_window_layers: int = 28

    def __post_init__(self):
        if not self.use_sliding_window:
            self.sliding_window = None
        super().__post_init__()

    def default_layer_types(self) -> list[str]:
        return [
            SLIDING if self.sliding_window and i >= self.max_window_layers else FULL
            for i in range(self.num_hidden_layers)
        ]


class Qwen2Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(replace(args, attention_bias=True), layer)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)


class Qwen3Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = super().project(x)  # (B, heads, L, head_dim): the norms act per head
        return self.q_norm(q), self.k_norm(k), v


ATTENTION = {"qwen2": Qwen2Attention, "qwen3": Qwen3Attention}


def qwen_block(args: ModelArgs, layer: int) -> TransformerBlock:
    attention = ATTENTION[args.model_type](args, layer)
    return TransformerBlock(args, attention, MLP(args.hidden_size, args.intermediate_size))


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, llama.llama_model(args, qwen_block))
