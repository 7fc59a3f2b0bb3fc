"""Read a Llama-family GGUF file (llama.cpp's format): config, weights and tokenizer.

``mx.load`` already parses GGUF and turns Q4_0/Q4_1/Q8_0 tensors into MLX's
affine quantized layout (``weight`` packed in uint32, ``scales``, ``biases``).
What is left to do here:

* keep every weight exactly as stored: ``mx.load`` gives the quantized layout's
  ``scales``/``biases`` in float16, and dequantizing in float16 rounds
  ``scale * q + bias`` (a Q8_0 value needs 19 significant bits), so they are
  widened to float32, in which every value of the supported types is exact (see
  ``EXACT_TYPES``). Other types (the K-quants...) ``mx.load`` rounds to
  float16, so they are refused;
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

import struct
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
# GGML tensor types by id (ggml.h ``ggml_type``), as far as a GGUF file may hold them.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip
# The types loaded exactly: floats as they are, and the block types whose values
# ``scale * q + bias`` (q of at most 8 bits, scale and bias float16 values) are exact
# in float32, as ggml itself dequantizes them: Q4_0 (bias -8 d), Q4_1 (bias m), Q8_0
# (bias -128 d).
EXACT_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}
# GGUF metadata value types (gguf.md): fixed-size scalars by struct format.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_DEFAULT_ALIGNMENT = 32
# GGUF token types (llama.cpp ``llama_token_type``).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's stored bytes are in a GGUF file, and how they are laid out.

    ``shape`` is in ggml order (fastest-varying dimension first), ``offset`` in bytes
    from the start of the file.
    """

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int


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
    check_exact_types(read_tensor_infos(path), path)
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
            weights[hf_name] = exact(name, value)
    weights = unpermute_qk(weights, config)
    return GGUFCheckpoint(config=config, weights=weights, metadata=metadata)


def exact(name: str, value: mx.array) -> mx.array:
    """The tensor as ``mx.load`` gives it, with quantization scales and biases in float32.

    They hold float16 values (ggml's ``d``, ``m``, and ``-8 d`` / ``-128 d``, exact
    in float16 too); in float32 ``scale * q + bias`` is then exact as well.
    """
    if name.endswith((".scales", ".biases")):
        return value.astype(mx.float32)
    return value


def check_exact_types(infos: list[TensorInfo], path: Path) -> None:
    """Refuse a file with tensors of a type that would not be loaded exactly."""
    inexact = sorted({info.type_name for info in infos} - EXACT_TYPES)
    if inexact:
        raise ValueError(
            f"GGUF file {path}: tensor types {', '.join(inexact)} are not supported "
            f"(supported: {', '.join(sorted(EXACT_TYPES))})"
        )


def read_tensor_infos(path: Path) -> list[TensorInfo]:
    """The tensor directory of a GGUF file (gguf.md: header, metadata, tensor infos).

    ``mx.load`` does not say which type each tensor was stored in; this does.
    """
    try:
        return _tensor_infos(path)
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise ValueError(f"cannot read GGUF file {path}: {error}") from error


def _tensor_infos(path: Path) -> list[TensorInfo]:
    with open(path, "rb") as file:
        data = file.read(1 << 20)
        reader = _Reader(data, file)
        if reader.take(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        _version, n_tensors, n_values = reader.unpack("<IQQ")
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_values):
            key = reader.string()
            value = reader.value(reader.unpack("<I")[0])
            if key == "general.alignment":
                alignment = value
        directory = []
        for _ in range(n_tensors):
            name = reader.string()
            (n_dims,) = reader.unpack("<I")
            shape = reader.unpack(f"<{n_dims}Q")
            type_id, offset = reader.unpack("<IQ")
            directory.append((name, shape, GGML_TYPE_NAMES.get(type_id, f"type {type_id}"), offset))
        start = -(-reader.position // alignment) * alignment
    return [
        TensorInfo(name, shape, kind, start + offset) for name, shape, kind, offset in directory
    ]


class _Reader:
    """Sequential little-endian reads from a file, refilled as needed."""

    def __init__(self, data: bytes, file) -> None:
        self.data, self.file, self.at, self.base = data, file, 0, 0

    @property
    def position(self) -> int:
        return self.base + self.at

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            more = self.file.read(max(n, 1 << 20))
            self.base += self.at
            self.data, self.at = self.data[self.at :] + more, 0
            if n > len(self.data):
                raise ValueError("GGUF header is truncated")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        return self.take(length).decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in GGUF_SCALARS:
            return self.unpack(GGUF_SCALARS[kind])[0]
        if kind == GGUF_STRING:
            return self.string()
        if kind == GGUF_ARRAY:
            item_kind, count = self.unpack("<IQ")
            if item_kind in GGUF_SCALARS:  # skipped whole: only the header's position matters
                self.take(count * struct.calcsize(GGUF_SCALARS[item_kind]))
                return None
            return [self.value(item_kind) for _ in range(count)]
        raise ValueError(f"GGUF metadata value of unknown type {kind}")


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
