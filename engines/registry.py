"""The engine registry: one table from an engine spec to an adapter, for every command.

``lmconform check``, ``snapshot``, ``bench`` and the pytest plugin all open engines
here, so an engine that one of them accepts, all of them accept. A spec is

    NAME[:key=value...]            a built-in engine (``reference``, ``mlx-lm``, ...)
    module.path:Class[:key=value...]   your own Python adapter (a subclass of Engine)
    cmd:COMMAND LINE               a program speaking the JSON-lines protocol (PROTOCOL.md)
    openai:URL[:key=value...]      a server speaking the OpenAI HTTP API (adapters/openai.py)

Options are the trailing ``:key=value`` parts; the adapter's constructor receives them
as keyword arguments (strings), so an option an engine does not take is an error
that names the engine. ``cmd:`` specs take no options: everything after ``cmd:`` is
the command line. An ``openai:`` URL holds colons itself, so there only trailing parts
that start with ``key=`` are options (``openai:http://host:8080/v1:model=m:chat=1``).
A peer that is not installed is ``EngineUnavailable`` with the command that installs it;
nothing here imports an engine's package before it is opened.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass, field

from engines.inputs import did_you_mean
from engines.models import ModelUnavailable, resolve


@dataclass(frozen=True)
class BuiltinEngine:
    target: str  # "module:Class"
    requires: tuple[str, ...]  # importable modules the engine needs
    install: str  # the command that installs them


BUILTIN_ENGINES = {
    "reference": BuiltinEngine(
        "engines.adapters.reference:ReferenceEngine",
        ("mlx", "reference"),
        "pip install -e .  (the reference engine ships with lmconform; it needs MLX)",
    ),
    "mlx-lm": BuiltinEngine(
        "engines.adapters.mlx_lm:MlxLmEngine",
        ("mlx", "mlx_lm"),
        "pip install mlx-lm==0.32.2   (or: pip install 'lmconform[peers]')",
    ),
    "transformers": BuiltinEngine(
        "engines.adapters.transformers:TransformersEngine",
        ("torch", "transformers", "gguf"),
        "pip install torch transformers gguf   (or: pip install 'lmconform[peers]')",
    ),
    "llama-cpp": BuiltinEngine(
        "engines.adapters.llama_cpp:LlamaCppEngine",
        ("llama_cpp",),
        "pip install 'lmconform[llama-cpp]'   (llama-cpp-python==0.3.36; it compiles llama.cpp)",
    ),
}

# The peers a default run compares the reference against, when installed.
PEERS = ("mlx-lm", "transformers", "llama-cpp")


class EngineUnavailable(Exception):
    """The engine cannot be used here (unknown, not installed, bad options, model missing)."""


@dataclass(frozen=True)
class EngineSpec:
    """A parsed engine spec; ``text`` is what the user wrote (the engine's label)."""

    text: str
    kind: str  # "builtin", "module", "cmd" or "openai"
    target: str  # built-in name, "module:Class", the command line or the server's URL
    options: dict[str, str] = field(default_factory=dict)

    def without(self, *keys: str) -> tuple[EngineSpec, dict[str, str]]:
        """This spec less the options ``keys`` (which a caller handles itself), and those."""
        taken = {k: v for k, v in self.options.items() if k in keys}
        kept = {k: v for k, v in self.options.items() if k not in keys}
        return EngineSpec(self.text, self.kind, self.target, kept), taken


def parse_spec(text: str) -> EngineSpec:
    """``NAME[:k=v...]``, ``module:Class[:k=v...]``, ``cmd:COMMAND`` or ``openai:URL[:k=v...]``."""
    text = text.strip()
    if text.startswith("cmd:"):
        command = text.removeprefix("cmd:").strip()
        if not command:
            raise EngineUnavailable("a cmd: engine needs a command line, e.g. cmd:./my-engine")
        return EngineSpec(text, "cmd", command)
    if text.startswith("openai:"):
        return _parse_openai(text)
    parts = text.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and "=" in parts[-1]:
        for item in reversed(parts.pop().split(",")):
            key, _, value = item.partition("=")
            if not key.strip():
                raise EngineUnavailable(f"engine option {item!r} in {text!r} must be key=value")
            options[key.strip()] = value.strip()
    target = ":".join(parts)
    if target in BUILTIN_ENGINES:
        return EngineSpec(text, "builtin", target, dict(reversed(options.items())))
    module, _, cls = target.partition(":")
    if not (module and cls) or not all(p.isidentifier() for p in [*module.split("."), cls]):
        known = ", ".join([*BUILTIN_ENGINES, "module:Class", "cmd:COMMAND", "openai:URL"])
        hint = did_you_mean(target, [*BUILTIN_ENGINES, "cmd", "openai"])
        raise EngineUnavailable(f"unknown engine {text!r}{hint}; use one of {known}")
    return EngineSpec(text, "module", target, dict(reversed(options.items())))


OPTION_PART = re.compile(r"^[A-Za-z_]\w*=")


def _parse_openai(text: str) -> EngineSpec:
    """``openai:URL[:k=v...]``: the URL's colons stay; trailing ``key=...`` parts are options."""
    parts = text.removeprefix("openai:").strip().split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and OPTION_PART.match(parts[-1]):
        for item in reversed(parts.pop().split(",")):
            key, _, value = item.partition("=")
            options[key.strip()] = value.strip()
    url = ":".join(parts)
    if not url.startswith(("http://", "https://")):
        raise EngineUnavailable(
            f"an openai: engine needs the server's URL, e.g. openai:http://127.0.0.1:8080/v1; "
            f"got {text!r}"
        )
    return EngineSpec(text, "openai", url, dict(reversed(options.items())))


def missing_requirements(name: str) -> list[str]:
    engine = BUILTIN_ENGINES[name]
    return [module for module in engine.requires if importlib.util.find_spec(module) is None]


def installed_peers() -> list[str]:
    return [name for name in PEERS if not missing_requirements(name)]


def engine_class(spec: str | EngineSpec) -> type:
    """The adapter class for ``spec`` (options are applied when it is opened)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "cmd":
        from engines.adapters.cmd import CmdEngine  # an engine in another process

        return CmdEngine.bind(spec.target)
    if spec.kind == "openai":
        from engines.adapters.openai import OpenAIEngine  # a server, over HTTP

        try:
            return OpenAIEngine.bind(spec.target)
        except ValueError as error:
            raise EngineUnavailable(f"engine {spec.text!r}: {error}") from None
    target = spec.target
    if spec.kind == "builtin":
        missing = missing_requirements(spec.target)
        if missing:
            raise EngineUnavailable(
                f"engine {spec.target!r} is not installed (missing: {', '.join(missing)}); "
                f"install it with: {BUILTIN_ENGINES[spec.target].install}"
            )
        target = BUILTIN_ENGINES[spec.target].target
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EngineUnavailable(
            f"cannot import {module_name!r} for engine {spec.text!r}: {error}"
        ) from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise EngineUnavailable(f"module {module_name!r} has no class {class_name!r}") from None


def check_spec(text: str | EngineSpec) -> EngineSpec:
    """``text`` parsed, its engine found and its options' names and values checked, without
    opening it: what every command does with an engine spec before anything runs."""
    spec = parse_spec(text) if isinstance(text, str) else text
    _check_options(engine_class(spec), spec)
    return spec


def _check_options(cls: type, spec: EngineSpec) -> None:
    """Option names against the constructor's keyword-only parameters; values by the
    adapter's ``option_checks`` (option name -> a validator of ``engines.inputs``)."""
    if not spec.options:
        return
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(spec.options) - set(accepted))
    if unknown:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no options"
        hint = did_you_mean(unknown[0], accepted) if len(unknown) == 1 else ""
        raise EngineUnavailable(
            f"engine {spec.target!r} has no option {', '.join(unknown)}{hint} ({takes})"
        )
    for key, check in getattr(cls, "option_checks", {}).items():
        if key in spec.options:
            try:
                check(spec.options[key])
            except ValueError as error:
                raise EngineUnavailable(
                    f"engine {spec.target!r}: option {key}={spec.options[key]!r}: {error}"
                ) from None


def open_engine(spec: str | EngineSpec, model: str):
    """An engine adapter for ``spec`` with ``model`` loaded, in a format it accepts."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    cls = engine_class(spec)
    _check_options(cls, spec)
    try:
        source = resolve(model, cls.model_formats)
    except ModelUnavailable as error:
        raise EngineUnavailable(f"engine {spec.text!r} cannot load {model}: {error}") from None
    return cls(source, **spec.options)
