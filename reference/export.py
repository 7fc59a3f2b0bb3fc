"""Write a model as a standard Hugging Face folder that other engines load.

``export_model("dummy", out_dir)`` writes:

* ``config.json`` (``architectures`` and ``model_type`` of the model's family,
  ``torch_dtype``, EOS ids);
* ``model.safetensors`` with Hugging Face parameter names (every family's
  reference model uses its checkpoints' names: fused ``qkv_proj`` for Phi-3,
  one module per MoE expert, ...);
* ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template),
  ``special_tokens_map.json``;
* ``generation_config.json`` with the EOS ids.

Float models (``dummy``) are written in float32 as plain PyTorch-layout
tensors, which transformers, mlx-lm and ``reference.load`` all read. Quantized
models (``smollm2-135m``) are written in MLX's quantized layout (``weight``
packed in uint32 plus ``scales`` and ``biases``, and a ``quantization`` entry
in ``config.json``): mlx-lm and ``reference.load`` read those, transformers
does not. GGUF's permuted query/key rows are already undone by the loader, so
the folder holds the ordinary Hugging Face layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .loading import load
from .tokenizer import TokenizerWrapper

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def export_model(name_or_path: str, out_dir: str | Path) -> Path:
    """Load ``name_or_path`` (anything ``load`` accepts) and write it to ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a folder")
    # The exact path: the folder keeps the quantized weights as they are stored.
    model, tokenizer, config = load(name_or_path, return_config=True, fast=False)
    out.mkdir(parents=True, exist_ok=True)

    weights = dict(tree_flatten(model.parameters()))
    quantized = any(name.endswith(".scales") for name in weights)
    config = export_config(config, weights, tokenizer)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(config))
    # "pt" tells transformers these are ordinary tensors; "mlx" marks MLX's own layout.
    metadata = {"format": "mlx" if quantized else "pt"}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata=metadata)
    write_tokenizer(tokenizer, out)
    return out


def export_config(
    config: dict[str, Any], weights: dict[str, mx.array], tokenizer: TokenizerWrapper
) -> dict[str, Any]:
    """``config.json`` for the written folder: the loaded config plus what other loaders need."""
    config = dict(config)
    config.setdefault("model_type", "llama")
    if config["model_type"] == "llama":  # other families' configs name their own class
        config.setdefault("architectures", ["LlamaForCausalLM"])
    config["torch_dtype"] = DTYPE_NAMES[float_dtype(weights)]
    eos = sorted(tokenizer.eos_token_ids)
    config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key, token_id in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("pad_token_id", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            config.setdefault(key, token_id)
    return config


def float_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The floating point type of the weights (of the scales, for quantized ones)."""
    for name in sorted(weights):
        if weights[name].dtype in DTYPE_NAMES:
            return weights[name].dtype
    raise ValueError("the model has no floating point weights")


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if key in config}


def write_tokenizer(tokenizer: TokenizerWrapper, out: Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (chat template inside) and the special tokens.

    The chat template goes into ``tokenizer_config.json`` rather than a separate
    ``chat_template.jinja``, which older loaders do not read.
    """
    hf_tokenizer = tokenizer.tokenizer
    hf_tokenizer.save_pretrained(str(out), save_jinja_files=False)
    # transformers 5 writes its new class name; the generic fast class loads in 4.x and 5.x.
    config_file = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(config_file, tokenizer_config)
    special = {
        key: value
        for key, value in (
            ("bos_token", hf_tokenizer.bos_token),
            ("eos_token", hf_tokenizer.eos_token),
            ("unk_token", hf_tokenizer.unk_token),
            ("pad_token", hf_tokenizer.pad_token),
        )
        if value is not None
    }
    write_json(out / "special_tokens_map.json", special)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
