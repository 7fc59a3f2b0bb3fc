"""Model families, one module per architecture, each with mlx-lm's contract.

Every family module defines ``ModelArgs`` (with ``from_config``) and ``Model``
(``__call__(inputs, cache, input_embeddings)``, ``layers``, ``make_cache``,
``sanitize``); ``llama.py`` holds the blocks the others reuse. ``build_model``
picks the family from a Hugging Face config's ``model_type``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import gemma, llama, moe, phi3, qwen

# model_type (as in config.json) -> the module that implements it.
FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen,
    "qwen3": qwen,
    "gemma2": gemma,
    "gemma3_text": gemma,
    "phi3": phi3,
    "qwen2_moe": moe,
    "qwen3_moe": moe,
    "mixtral": moe,
}


def family(model_type: str) -> ModuleType:
    """The module implementing ``model_type``; a clear error naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the reference; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def build_model(config: dict[str, Any]):
    """An uninitialised model for a Hugging Face ``config.json`` dict (Llama if no model_type)."""
    module = family(config.get("model_type", "llama"))
    check_sizes(config)
    return module.Model(module.ModelArgs.from_config(config))


# Sizes every family reads; a zero, negative or non-integer one would fail deep inside a
# layer with a message that names nothing ("math domain error").
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "head_dim",
)


def check_sizes(config: dict[str, Any]) -> None:
    """``ValueError`` naming the first size field of ``config`` that is not a positive integer."""
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
