"""Read a Llama-family GGUF file (llama.cpp's format): config, weights and tokenizer.

``mx.load`` already parses GGUF and turns Q4_0/Q4_1/Q8_0 tensors into MLX's
affine quantized layout (``weight`` packed in uint32, ``scales``, ``biases``).
What is left to do here:

* rename tensors from llama.cpp names (``blk.3.attn_q``) to Hugging Face names
  (``model.layers.3.self_attn.q_proj``), so the ordinary ``Model`` loads them;
* undo the row permutation that llama.cpp's converter applies to the query
  and key projections (its RoPE pairs adjacent dimensions, ours pairs the two
  halves of each head);
* build the Hugging Face config dict and the tokenizer from the metadata.

Quantized tensors keep their ``scales``/``biases``; the loader quantizes the
matching modules (see ``loading.py``), exactly as for an MLX-quantized folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .tokenizer import TokenizerWrapper

# llama.cpp tensor name -> Hugging Face module path. ``{i}`` is the layer index.
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors that carry no parameters of ours: llama.cpp's precomputed RoPE
# frequencies (we compute them from the config).
IGNORED_TENSORS = {"rope_freqs"}

# Only llama: llama.cpp permutes the q/k rows of llama models (see ``unpermute_qk``)
# but not of other architectures, which would each need their own handling.
SUPPORTED_ARCHITECTURES = {"llama"}
# GGUF token types (llama.cpp ``llama_token_type``).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, in Hugging Face terms."""

    config: dict[str, Any]
    weights: dict[str, mx.array]
    metadata: dict[str, Any]


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read a GGUF file into a Hugging Face style config and weights.

    Raises ``ValueError`` naming the file if it is truncated, corrupt or not a
    supported architecture.
    """
    path = Path(path)
    try:
        raw_weights, raw_metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"cannot read GGUF file {path}: {error}") from error
    metadata = {key: plain_value(value) for key, value in raw_metadata.items()}
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    config = gguf_config(metadata, has_output="output.weight" in raw_weights)
    weights = {}
    for name, value in raw_weights.items():
        hf_name = hf_tensor_name(name, path)
        if hf_name is not None:
            weights[hf_name] = value
    weights = unpermute_qk(weights, config)
    return GGUFCheckpoint(config=config, weights=weights, metadata=metadata)


def plain_value(value: Any) -> Any:
    """GGUF metadata as plain Python: scalars as int/float/bool, arrays as lists."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def hf_tensor_name(name: str, path: Path) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``.

    The last component (``weight``, ``bias``, or the quantization ``scales``
    and ``biases``) is kept. Returns None for tensors we do not need.
    """
    module, _, param = name.rpartition(".")
    parts = module.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}.{param}"
    if module in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[module]}.{param}"
    if module in IGNORED_TENSORS:
        return None
    raise ValueError(f"GGUF file {path}: unexpected tensor {name!r}")


def gguf_config(metadata: dict[str, Any], has_output: bool) -> dict[str, Any]:
    """The Hugging Face ``config.json`` equivalent of the GGUF metadata."""
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": get("vocab_size", len(metadata["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": not has_output,
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = value
    return config


def unpermute_qk(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """Undo llama.cpp's per-head row permutation of the query and key projections.

    llama.cpp rotates adjacent pairs of dimensions (``traditional`` RoPE), so
    its converter reorders each head's rows from ``[first half, second half]``
    to interleaved pairs. Rows are the output dimension, so quantized weights,
    scales and biases (and a bias vector) are all permuted the same way.
    """
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    fixed = {}
    for name, value in weights.items():
        module = name.rsplit(".", 2)[-2]
        fixed[name] = unpermute_rows(value, heads[module]) if module in heads else value
    return fixed


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Rows of each head go from interleaved pairs (0, 1), (2, 3)... back to two halves."""
    rows = x.shape[0]
    half_head = rows // n_heads // 2
    x = x.reshape(n_heads, half_head, 2, *x.shape[1:]).swapaxes(1, 2)
    return x.reshape(rows, *x.shape[3:])


def gguf_tokenizer(metadata: dict[str, Any], path: str | Path, **kwargs: Any) -> TokenizerWrapper:
    """The tokenizer stored in the GGUF metadata (byte-level BPE, ``gpt2`` style).

    ``kwargs`` go to ``PreTrainedTokenizerFast`` (e.g. a different ``chat_template``).
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF file {path}: tokenizer model {kind!r} is not supported "
            "(only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]

    backend = Tokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    )
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) are special: matched before BPE and
    # skipped by ``decode(skip_special_tokens=True)``. User-defined tokens are
    # matched whole but are ordinary text.
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == TOKEN_TYPE_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == TOKEN_TYPE_USER_DEFINED
        ]
    )

    def token_at(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]

    bos = token_at("bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    options = {
        "bos_token": bos,
        "eos_token": token_at("eos_token_id"),
        "unk_token": token_at("unknown_token_id"),
        "pad_token": token_at("padding_token_id"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }
    options = {key: value for key, value in options.items() if value is not None}
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **(options | kwargs))
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    return TokenizerWrapper(hf_tokenizer, eos_token_ids=None if eos_id is None else [eos_id])
