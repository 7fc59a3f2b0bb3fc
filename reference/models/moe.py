"""Sparse mixture-of-experts models: Qwen3-MoE, Qwen2-MoE and Mixtral.

The attention is the family's own (Qwen3's with q/k norms, Qwen2's with biases,
Llama's for Mixtral); the MLP of a sparse layer becomes a router plus experts:

1. the router (``gate``) scores every expert; a softmax over *all* experts turns
   the scores into probabilities (before the top-k, as transformers does);
2. each token keeps its ``num_experts_per_tok`` most probable experts;
3. with ``norm_topk_prob`` (always for Mixtral) the kept probabilities are
   rescaled to sum to 1; without it they are used as they are;
4. the output is the gate-weighted sum of the kept experts' outputs (Qwen2-MoE
   adds a shared expert, weighted by a sigmoid gate).

Each expert is an ordinary SwiGLU MLP with its own parameters, named as in the
checkpoints (``mlp.experts.3.gate_proj``; Mixtral: ``block_sparse_moe.experts.3.w1``).
An expert that no token chose is not run; a chosen one runs on all tokens and
is weighted by zero where a token did not choose it, which is simple and exact
but costs up to ``num_experts / num_experts_per_tok`` times the work in prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx import nn

from . import llama, qwen
from .llama import MLP, TransformerBlock


@dataclass
class ModelArgs(llama.ModelArgs):
    num_experts: int = 8  # Mixtral's num_local_experts
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # per expert; Mixtral: intermediate_size
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1  # every step-th layer is sparse ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... except these
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE
    qkv_bias: bool = True  # Qwen2-MoE
    use_sliding_window: bool = False  # Qwen MoEs: a window only if set (then in every layer)

    def __post_init__(self):
        if self.model_type == "mixtral":
            self.moe_intermediate_size = self.intermediate_size
            self.norm_topk_prob = True
        elif not self.use_sliding_window:
            self.sliding_window = None
        elif self.model_type == "qwen2_moe":
            raise NotImplementedError("qwen2_moe with use_sliding_window is not supported")
        super().__post_init__()

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        if "num_local_experts" in config:  # Mixtral's name
            config = {**config, "num_experts": config["num_local_experts"]}
        return super().from_config(config)

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def route(logits: mx.array, top_k: int, normalize: bool) -> mx.array:
    """Gate of every expert for every token (..., num_experts): zero unless among its top k.

    The softmax runs over all experts in float32, then the top k are kept (and
    rescaled to sum to 1 if ``normalize``).
    """
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    kept = mx.argpartition(-probs, top_k - 1, axis=-1)[..., :top_k]  # (..., top_k)
    weights = mx.take_along_axis(probs, kept, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return mx.put_along_axis(mx.zeros_like(probs), kept, weights, axis=-1)


class SparseMoE(nn.Module):
    """Router plus ``num_experts`` experts built by ``expert(hidden_size, expert_size)``."""

    def __init__(self, args: ModelArgs, expert: Callable[[int, int], nn.Module]):
        super().__init__()
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)  # the router
        dim, hidden = args.hidden_size, args.moe_intermediate_size
        self.experts = [expert(dim, hidden) for _ in range(args.num_experts)]
        self.top_k, self.normalize = args.num_experts_per_tok, args.norm_topk_prob
        self.has_shared_expert = bool(args.shared_expert_intermediate_size)
        if self.has_shared_expert:
            self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gates = route(self.gate(x), self.top_k, self.normalize).astype(x.dtype)  # (B, L, experts)
        chosen = np.flatnonzero(np.array(mx.any(gates > 0, axis=(0, 1))))
        out = mx.zeros_like(x)
        for e in chosen:  # in expert order, as transformers adds them up
            out = out + gates[..., e : e + 1] * self.experts[e](x)
        if self.has_shared_expert:
            out = out + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MixtralExpert(nn.Module):
    """A SwiGLU MLP under Mixtral's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class MixtralBlock(TransformerBlock):
    """Llama's block with its MLP stored under Mixtral's name, ``block_sparse_moe``."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, llama.Attention(args, layer), SparseMoE(args, MixtralExpert))
        self.block_sparse_moe = self.mlp
        del self.mlp

    def __call__(self, x: mx.array, mask: mx.array | None, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


def qwen_moe_block(args: ModelArgs, layer: int) -> TransformerBlock:
    if args.model_type == "qwen3_moe":
        attention = qwen.Qwen3Attention(args, layer)
    else:  # Qwen2-MoE: Qwen2's attention, biases as qkv_bias says
        attention = (qwen.Qwen2Attention if args.qkv_bias else llama.Attention)(args, layer)
    if args.is_sparse(layer):
        mlp = SparseMoE(args, MLP)
    else:
        mlp = MLP(args.hidden_size, args.intermediate_size)
    return TransformerBlock(args, attention, mlp)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        block = MixtralBlock if args.model_type == "mixtral" else qwen_moe_block
        super().__init__(args, llama.llama_model(args, block))
