"""Where the peer engines find a model: exported Hugging Face folders, cached.

The reference loads ``dummy`` or ``smollm2-135m`` by name. mlx-lm and transformers
load folders, so the reference writes one (``reference.export.export_model``) and
it is kept under ``.lmconform/models/<name>`` for the next run. Export goes to a
temporary folder renamed into place at the end, so a run killed mid-export never
leaves a half-written folder that a later run would trust.

Transformers cannot read MLX's quantized layout; for ``smollm2-135m`` it reads the
original GGUF file instead (transformers de-quantizes GGUF itself), see
``gguf_file``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DEFAULT_ROOT = Path(".lmconform") / "models"


def exported_folder(name: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """A Hugging Face folder holding model ``name`` (a folder path is returned as is)."""
    if Path(name).is_dir():
        return Path(name)
    folder = Path(root) / name
    if (folder / "config.json").exists():
        return folder
    from reference.export import export_model

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_model(name, partial)
    partial.rename(folder)
    return folder


def gguf_file(name: str) -> Path | None:
    """The GGUF file behind a built-in quantized model, or None for other models."""
    if name.endswith(".gguf") and Path(name).is_file():
        return Path(name)
    if name == "smollm2-135m":
        from reference.loading import smollm2_gguf_path

        return smollm2_gguf_path()
    return None
