"""The built-in test models: tiny, deterministic, file-free, one per architecture family.

``dummy`` and ``dummy-draft`` are small Llama models (GQA, RoPE, RMSNorm,
SwiGLU, untied head); ``dummy-qwen2``, ``dummy-qwen3``, ``dummy-gemma``
(Gemma 2), ``dummy-gemma3``, ``dummy-phi3``, ``dummy-moe`` (Qwen3-MoE),
``dummy-qwen2-moe`` and ``dummy-mixtral`` are the same size in the other
families of ``reference/models/``. Weights come from NumPy's PCG64 generator
with fixed seeds, so every machine builds bit-identical float32 weights
without downloading anything. ``DUMMY_MODELS`` lists them all.

The tokenizer is byte level with no merges: one token per UTF-8 byte (token id
= byte value), plus a few special tokens and a ChatML chat template. A
non-ASCII character such as "é" spans two tokens, which is what streaming
detokenizer tests need.

The initial scales are tuned for *well-conditioned* greedy decoding: along the
greedy path of ``STANDARD_PROMPTS`` the gap between the best and second-best
log-probability is large (median well above 0.5 nats), so two correct engines
that differ by float rounding still pick the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .tokenizer import TokenizerWrapper

PAD, END_OF_TEXT, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, END_OF_TEXT, IM_START, IM_END]
BYTE_VOCAB_SIZE = 256
VOCAB_SIZE = BYTE_VOCAB_SIZE + len(SPECIAL_TOKENS)

# Ids of the special tokens follow the 256 byte tokens, in SPECIAL_TOKENS order.
PAD_ID, END_OF_TEXT_ID, IM_START_ID, IM_END_ID = range(BYTE_VOCAB_SIZE, VOCAB_SIZE)
# <|im_end|> ends a chat turn; <|endoftext|> ends a document. Two EOS ids, as in
# many real models, so that "stop on any of several EOS ids" gets exercised.
EOS_TOKEN_IDS = [IM_END_ID, END_OF_TEXT_ID]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Short prompts on which the dummy models are measured to be well conditioned.
STANDARD_PROMPTS = [
    "Hello, world!",
    "The quick brown fox",
    "Once upon a time",
    "What is the capital of France?",
    "A café in Paris",
    "1, 2, 3, 4,",
    "def main():",
]


# Standard deviations of the initial weights, as multiples of 1/sqrt(fan_in),
# chosen by measuring (see tests/test_loading.py, tests/test_architectures.py):
# - HEAD_GAIN sets how peaked the next-token distribution is, hence the greedy
#   margins (median about 2.4 nats for ``dummy``);
# - ATTENTION_GAIN makes attention far from uniform, so that the output depends
#   on positions and on what the cache holds;
# - RESIDUAL_GAIN (output projections of attention and MLP) keeps the layers'
#   additions small next to the token embedding: the 1-layer draft then agrees
#   with ``dummy`` on about 40% of greedy tokens, yet the context still changes
#   about 70% of the predictions.
EMBEDDING_STD = 1.0
NORM_JITTER = 0.1
ATTENTION_GAIN = 2.0
MLP_GAIN = 1.0
RESIDUAL_GAIN = 0.2
HEAD_GAIN = 10.0


@dataclass(frozen=True)
class Gains:
    """Scales of the initial weights by role (defaults: the constants above)."""

    embedding: float = EMBEDDING_STD  # absolute standard deviation
    norm_center: float = 1.0  # norm weights are center + jitter * N(0, 1)
    final_norm_center: float = 1.0  # the same for the final norm (it scales the logits)
    norm_jitter: float = NORM_JITTER
    attention: float = ATTENTION_GAIN
    mlp: float = MLP_GAIN
    residual: float = RESIDUAL_GAIN
    head: float = HEAD_GAIN
    router: float = 1.0  # MoE router: logits of about unit spread, so routing is not one-hot


@dataclass(frozen=True)
class DummySpec:
    """What distinguishes one built-in dummy model from another."""

    seed: int
    num_hidden_layers: int
    description: str
    architecture: dict[str, Any] = field(default_factory=dict)  # config.json entries over Llama's
    gains: Gains = Gains()


# Gemma's norms scale by (1 + weight), so their stored weights are offsets around 0.
# Its head is the embedding (tied), so the embedding's scale sets the logits' spread.
GEMMA_GAINS = Gains(norm_center=0.0, final_norm_center=7.0, embedding=0.05, mlp=3.0)
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}

DUMMY_MODELS = {
    "dummy": DummySpec(
        seed=20240601,
        num_hidden_layers=2,
        description="tiny deterministic Llama (byte vocab, 2 layers, GQA 4/2 heads, fp32)",
    ),
    "dummy-draft": DummySpec(
        seed=20240602,
        num_hidden_layers=1,
        description="draft model for 'dummy': same tokenizer, embedding and head; 1 own layer",
    ),
    "dummy-qwen2": DummySpec(
        seed=20240611,
        num_hidden_layers=2,
        description="tiny Qwen2: q/k/v biases; layer 1 slides a 16-token window",
        architecture={
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 1,
        },
    ),
    "dummy-qwen3": DummySpec(
        seed=20240612,
        num_hidden_layers=2,
        description="tiny Qwen3: RMSNorm on each head's queries and keys",
        architecture={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
    ),
    "dummy-gemma": DummySpec(
        seed=20240613,
        num_hidden_layers=2,
        description="tiny Gemma 2: soft-capping, 4 norms per layer, local (16) / global layers",
        architecture={
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "tie_word_embeddings": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 32,
            "attn_logit_softcapping": 10.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 16,
            "rms_norm_eps": 1e-6,
        },
        gains=GEMMA_GAINS,
    ),
    "dummy-gemma3": DummySpec(
        seed=20240614,
        num_hidden_layers=3,
        description="tiny Gemma 3 (text): q/k norms, 2 local (16, own RoPE base) then 1 global",
        architecture={
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "tie_word_embeddings": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 4,
            "sliding_window": 16,
            "sliding_window_pattern": 3,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rms_norm_eps": 1e-6,
        },
        gains=GEMMA_GAINS,
    ),
    "dummy-phi3": DummySpec(
        seed=20240615,
        num_hidden_layers=2,
        description="tiny Phi-3: fused qkv_proj and gate_up_proj, RoPE on half of each head",
        architecture={
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "partial_rotary_factor": 0.5,
        },
    ),
    "dummy-moe": DummySpec(
        seed=20240616,
        num_hidden_layers=2,
        description="tiny Qwen3-MoE: 4 experts, top 2, renormalised gates",
        architecture={
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **MOE,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,  # mlx-lm needs these two written out
            "mlp_only_layers": [],
        },
    ),
    "dummy-qwen2-moe": DummySpec(
        seed=20240617,
        num_hidden_layers=2,
        description="tiny Qwen2-MoE: 4 experts, top 2, gates not renormalised, shared expert",
        architecture={
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            **MOE,
            "norm_topk_prob": False,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "dummy-mixtral": DummySpec(
        seed=20240618,
        num_hidden_layers=2,
        description="tiny Mixtral: 4 experts (w1/w2/w3), top 2",
        architecture={
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
        },
    ),
}
# Seed of the embedding, final norm and head, which all dummy models share.
FAMILY_SEED = 20240600


def dummy_config(spec: DummySpec) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a dummy model."""
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_TOKEN_IDS,
    }
    return llama | spec.architecture


def initial_weight(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, gains: Gains = Gains()
) -> np.ndarray:
    """One parameter's initial value, drawn from ``rng``; the scale depends on its role."""
    if name.endswith("norm.weight"):
        # Not all ones, so that a loader that drops norm weights is caught.
        center = gains.final_norm_center if name == "model.norm.weight" else gains.norm_center
        return center + gains.norm_jitter * rng.standard_normal(shape)
    if name == "model.embed_tokens.weight":
        return gains.embedding * rng.standard_normal(shape)
    if name == "lm_head.weight":
        gain = gains.head
    elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):
        gain = gains.residual
    elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
        gain = gains.router
    elif ".mlp." in name or ".block_sparse_moe." in name:
        gain = gains.mlp
    else:
        gain = gains.attention
    return gain / np.sqrt(shape[-1]) * rng.standard_normal(shape)


def dummy_weights(model: nn.Module, spec: DummySpec) -> dict[str, mx.array]:
    """All parameters of ``model`` (built from ``dummy_config(spec)``), in float32.

    The transformer layers are drawn from ``spec.seed``. The embedding, final norm
    and head are drawn from ``FAMILY_SEED``, shared by all dummy models: like a
    real draft model of the same family, ``dummy-draft`` then often predicts
    the same next token as ``dummy``, so speculative decoding accepts some
    drafts instead of rejecting them all. Each group is drawn in sorted-name
    order, so the values depend only on the seeds and the architecture.
    """
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    shared = sorted(name for name in shapes if ".layers." not in name)
    layers = sorted(name for name in shapes if ".layers." in name)
    weights = {}
    for names, group_seed in ((shared, FAMILY_SEED), (layers, spec.seed)):
        rng = np.random.Generator(np.random.PCG64(group_seed))
        for name in names:
            value = initial_weight(name, shapes[name], rng, spec.gains)
            weights[name] = mx.array(value.astype(np.float32))
    return weights


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the others (control characters,
    space, ...) are shifted to code points from 256 upward, so every byte has a
    visible, whitespace-free character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(BYTE_VOCAB_SIZE) if b not in mapping)
    for n, b in enumerate(shifted):
        mapping[b] = chr(BYTE_VOCAB_SIZE + n)
    return dict(sorted(mapping.items()))


def dummy_hf_tokenizer(**options: Any) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer of the dummy models, as a transformers tokenizer.

    ``options`` override the defaults (e.g. another ``chat_template``).
    """
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    defaults = {"eos_token": IM_END, "pad_token": PAD, "chat_template": CHAT_TEMPLATE}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **(defaults | options))


def dummy_tokenizer(options: dict[str, Any] | None = None) -> TokenizerWrapper:
    """The dummy tokenizer with both EOS ids (``<|im_end|>`` and ``<|endoftext|>``)."""
    return TokenizerWrapper(dummy_hf_tokenizer(**(options or {})), eos_token_ids=EOS_TOKEN_IDS)
