"""GGUF weights are loaded exactly as stored.

The expected values come from the stored block bytes, dequantized here with numpy
from ggml's block layouts (each block: float16 ``d`` [and ``m``], then the quants):

* Q8_0: 32 values, ``d`` then 32 int8 ``q``; value ``d * q``;
* Q4_0: 32 values, ``d`` then 16 bytes; value j < 16 is byte j's low nibble,
  value j + 16 its high nibble; value ``d * (q - 8)``;
* Q4_1: as Q4_0 with ``m`` after ``d``; value ``d * q + m``.

ggml computes these in float32; a float32 value is what the model must get.
"""

from __future__ import annotations

import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from reference.gguf import hf_tensor_name, read_gguf, read_tensor_infos, unpermute_rows
from reference.loading import load, quantized_layout, smollm2_gguf_path

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "BF16": 30}


def dequantize_blocks(raw: bytes, type_name: str) -> np.ndarray:
    """Float32 values of a tensor's stored bytes, from ggml's block layout."""
    if type_name in FLOAT_DTYPES:
        return np.frombuffer(raw, FLOAT_DTYPES[type_name]).astype(np.float32)
    if type_name == "BF16":  # the high half of a float32
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, BLOCK_BYTES[type_name])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if type_name == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).ravel()
    packed = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    if type_name == "Q4_0":
        return (d * (q - 8)).ravel()
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).ravel()


def stored_values(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``{Hugging Face name: (type, float32 values in the model's row order)}``."""
    infos = read_tensor_infos(path)
    checkpoint = read_gguf(path)
    heads = {
        "self_attn.q_proj": checkpoint.config["num_attention_heads"],
        "self_attn.k_proj": checkpoint.config["num_key_value_heads"],
    }
    values = {}
    with open(path, "rb") as file:
        for info in infos:
            count = int(np.prod(info.shape))
            file.seek(info.offset)
            raw = file.read(stored_size(info.type_name, count))
            array = dequantize_blocks(raw, info.type_name).reshape(info.shape[::-1])
            name = hf_tensor_name(info.name, path)
            for module, n_heads in heads.items():
                if module in name:  # llama.cpp's row order, undone as the loader does
                    array = np.array(unpermute_rows(mx.array(array), n_heads))
            values[name] = (info.type_name, array)
    return values


def stored_size(type_name: str, count: int) -> int:
    if type_name in BLOCK_BYTES:
        return count // BLOCK * BLOCK_BYTES[type_name]
    return count * (4 if type_name == "F32" else 2)


def loaded_values(weights: dict[str, mx.array]) -> dict[str, np.ndarray]:
    """The reference's weights as float32 values (quantized ones dequantized by MLX)."""
    values = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.scales" in weights:
            value = dequantize(value, weights[f"{module}.scales"], weights[f"{module}.biases"])
        values[name] = np.array(value.astype(mx.float32))
    return values


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """MLX's values of a ggml-derived quantized weight (one group per 32-value block)."""
    _, bits = quantized_layout(packed, scales, scales.shape[-1] * BLOCK)
    return mx.dequantize(packed, scales, biases, group_size=BLOCK, bits=bits)


def assert_exact(path: Path) -> set[str]:
    """Every tensor of ``path`` equals its stored values, bit for bit; returns the types seen."""
    expected = stored_values(path)
    actual = loaded_values(read_gguf(path).weights)
    assert actual.keys() == expected.keys()
    for name, (type_name, values) in expected.items():
        assert actual[name].shape == values.shape, name
        mismatched = int(np.sum(actual[name] != values))
        assert mismatched == 0, f"{name} ({type_name}): {mismatched} of {values.size} differ"
    return {type_name for type_name, _ in expected.values()}


# --- a small GGUF file built here -----------------------------------------------------------


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, metadata: dict, tensors: list[tuple[str, tuple, str, bytes]]) -> None:
    """A GGUF v3 file: ``metadata`` (str, int or list of str), tensors as (name, ggml shape,
    type, stored bytes), each aligned to 32 bytes."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        header += gguf_string(key)
        if isinstance(value, str):
            header += struct.pack("<I", 8) + gguf_string(value)
        elif isinstance(value, int):
            header += struct.pack("<II", 4, value)
        else:
            header += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(gguf_string, value))
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % 32)
        offsets.append(len(data))
        data += raw
    for (name, shape, type_name, _), offset in zip(tensors, offsets):
        header += gguf_string(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
        header += struct.pack("<IQ", TYPE_IDS[type_name], offset)
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + data)


def random_blocks(type_name: str, count: int, rng: np.random.Generator) -> bytes:
    """Stored bytes of ``count`` values: random quants, and scales with full float16
    mantissas (so that float16 arithmetic on them would round), of both signs for ``m``."""
    n_blocks = count // BLOCK
    blocks = rng.integers(0, 256, size=(n_blocks, BLOCK_BYTES[type_name]), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.0, n_blocks) * 2.0 ** rng.integers(-12, -2, n_blocks)).astype(
        np.float16
    )
    blocks[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    if type_name == "Q4_1":
        m = (rng.normal(size=n_blocks) * 0.05).astype(np.float16)
        blocks[:, 2:4] = m.view(np.uint8).reshape(-1, 2)
    return blocks.tobytes()


def random_floats(type_name: str, count: int, rng: np.random.Generator) -> bytes:
    values = rng.normal(size=count).astype(np.float32)
    if type_name == "BF16":
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.astype(FLOAT_DTYPES[type_name]).tobytes()


HIDDEN, VOCAB = 64, 8


def small_llama(path: Path, types: dict[str, str]) -> None:
    """A one-layer llama GGUF (2 heads of 32, 1 KV head) with the given tensor types."""
    shapes = {
        "token_embd.weight": (HIDDEN, VOCAB),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (HIDDEN, 32),
        "blk.0.attn_v.weight": (HIDDEN, 32),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": (HIDDEN, 64),
        "blk.0.ffn_up.weight": (HIDDEN, 64),
        "blk.0.ffn_down.weight": (64, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "output_norm.weight": (HIDDEN,),
    }
    rng = np.random.default_rng(0)
    tensors = []
    for name, shape in shapes.items():
        type_name = types.get(name, "F32")
        count = int(np.prod(shape))
        maker = random_blocks if type_name in BLOCK_BYTES else random_floats
        if type_name == "Q4_K":  # 256 values in 144 bytes; never read
            raw = bytes(count // 256 * 144)
        else:
            raw = maker(type_name, count, rng)
        tensors.append((name, shape, type_name, raw))
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": 64,
        "llama.block_count": 1,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(VOCAB)],
    }
    write_gguf(path, metadata, tensors)


EVERY_TYPE = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_0",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.attn_v.weight": "F16",
    "blk.0.attn_output.weight": "BF16",
    "blk.0.ffn_gate.weight": "Q8_0",
    "blk.0.ffn_up.weight": "Q4_1",
    "blk.0.ffn_down.weight": "Q4_0",
}


def test_every_supported_type_is_loaded_exactly(tmp_path):
    path = tmp_path / "small.gguf"
    small_llama(path, EVERY_TYPE)
    assert assert_exact(path) == {"Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"}


def test_the_blocks_would_round_in_float16(tmp_path):
    """The check has teeth: dequantizing these blocks in float16 (what ``mx.load``'s
    scales alone give) changes values of every quantized type."""
    path = tmp_path / "small.gguf"
    small_llama(path, EVERY_TYPE)
    expected = stored_values(path)
    stored = mx.load(str(path))
    rounded = set()
    for module in ("token_embd", "blk.0.ffn_gate", "blk.0.ffn_up", "blk.0.ffn_down"):
        scales = stored[f"{module}.scales"]
        assert scales.dtype == mx.float16
        halves = dequantize(stored[f"{module}.weight"], scales, stored[f"{module}.biases"])
        type_name, exact = expected[hf_tensor_name(f"{module}.weight", path)]
        if np.any(np.array(halves.astype(mx.float32)) != exact):
            rounded.add(type_name)
    assert rounded == {"Q8_0", "Q4_1", "Q4_0"}


def test_a_type_that_would_not_be_exact_is_refused(tmp_path):
    path = tmp_path / "kquant.gguf"
    small_llama(path, {"blk.0.ffn_down.weight": "Q4_K"})
    with pytest.raises(ValueError, match=r"kquant\.gguf.*Q4_K"):
        load(str(path))


@pytest.mark.smollm
def test_smollm_gguf_is_loaded_exactly():
    """The real file: Q8_0 token embeddings, Q4_1 projections, F32 norms."""
    assert assert_exact(smollm2_gguf_path()) == {"Q8_0", "Q4_1", "F32"}
