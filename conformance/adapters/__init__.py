"""Finding and opening engines by name: reference, mlx-lm, transformers or module:Class.

A peer engine that is not installed is reported as ``EngineUnavailable`` with
the command that installs it; the caller shows that as a skip. Nothing here
imports an engine's package until that engine is opened, so listing what is
available stays cheap and never raises ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from ..model_sources import ModelUnavailable, resolve


@dataclass(frozen=True)
class BuiltinAdapter:
    target: str  # "module:Class"
    requires: tuple[str, ...]  # importable modules the engine needs
    install: str  # the command that installs them


BUILTIN_ADAPTERS = {
    "reference": BuiltinAdapter(
        "conformance.adapters.reference:ReferenceEngine",
        ("mlx", "reference"),
        "pip install -e .  (the reference engine ships with lmconform; it needs MLX)",
    ),
    "mlx-lm": BuiltinAdapter(
        "conformance.adapters.mlx_lm:MlxLmEngine",
        ("mlx", "mlx_lm"),
        "pip install mlx-lm==0.32.2   (or: pip install 'lmconform[peers]')",
    ),
    "transformers": BuiltinAdapter(
        "conformance.adapters.transformers:TransformersEngine",
        ("torch", "transformers", "gguf"),
        "pip install torch transformers gguf   (or: pip install 'lmconform[peers]')",
    ),
}

PEERS = ("mlx-lm", "transformers")


class EngineUnavailable(Exception):
    """The engine cannot be used here (not installed, or the model is not available to it)."""


def missing_requirements(name: str) -> list[str]:
    adapter = BUILTIN_ADAPTERS[name]
    return [module for module in adapter.requires if importlib.util.find_spec(module) is None]


def installed_peers() -> list[str]:
    return [name for name in PEERS if not missing_requirements(name)]


def engine_class(spec: str) -> type:
    """The adapter class for ``spec``: a built-in name or ``module:Class``."""
    if spec in BUILTIN_ADAPTERS:
        missing = missing_requirements(spec)
        if missing:
            raise EngineUnavailable(
                f"engine {spec!r} is not installed (missing: {', '.join(missing)}); "
                f"install it with: {BUILTIN_ADAPTERS[spec].install}"
            )
        target = BUILTIN_ADAPTERS[spec].target
    elif spec.startswith("cmd:"):
        from .cmd import CmdEngine  # an engine in another process, over JSON lines

        return CmdEngine.bind(spec.removeprefix("cmd:"))
    elif ":" in spec:
        target = spec
    else:
        known = ", ".join([*BUILTIN_ADAPTERS, "module:Class"])
        raise EngineUnavailable(f"unknown engine {spec!r}; use one of {known}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EngineUnavailable(
            f"cannot import {module_name!r} for engine {spec!r}: {error}"
        ) from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise EngineUnavailable(f"module {module_name!r} has no class {class_name!r}") from None


def open_engine(spec: str, model: str):
    """An engine adapter for ``spec`` with ``model`` loaded, in a format it accepts."""
    cls = engine_class(spec)
    try:
        source = resolve(model, cls.model_formats)
    except ModelUnavailable as error:
        raise EngineUnavailable(f"engine {spec!r} cannot load {model}: {error}") from None
    return cls(source)
