"""Engines as the benchmarks see them: a registry adapter plus what timing needs to know.

Benchmarks wrap no engine of their own. ``open_timed(spec, model)`` opens the adapter
through ``engines.registry`` (so ``lmconform bench`` takes every engine ``lmconform
check`` takes: built-in names, ``module:Class``, ``cmd:COMMAND``) and adds:

- the prompts' tokenizer: the reference's tokenizer of the model, as in conformance,
  so every engine is handed the same token ids;
- the end tokens to ban (a logit bias of -inf), so every trial decodes its full length;
- a memory meter and the weight bytes the roofline divides by, chosen by what the
  adapter holds: an MLX model (MLX's allocator), a PyTorch model (the process's
  resident set), or nothing in this process (the engine's own ``usage`` report under
  the JSON-lines ``timing/1`` extension, else unknown).

An adapter may describe itself instead with a ``timing_profile()`` method returning a
``Profile`` (the test instruments in ``instruments.py`` do).

Two options belong to the benchmarks, not to the engine, and are taken off the spec
before it is opened: ``name=`` (the name recorded in the history; runs are compared
by name) and ``slowdown=`` (each decode step made that fraction slower, see
``instruments.slowed``). Test instruments have names of their own (``INSTRUMENTS``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from benchmarks import memory
from engines.inputs import non_empty, number
from engines.jsonl_protocol import EngineTimes
from engines.models import ModelSource
from engines.protocol import (
    BatchRequest,
    BatchRow,
    DraftSettings,
    GenerateRequest,
    ProcessorSettings,
    TokenEvent,
)
from engines.registry import (
    EngineSpec,
    EngineUnavailable,
    check_spec,
    engine_class,
    open_engine,
    parse_spec,
)

BENCH_OPTIONS = ("name", "slowdown")
# Engines that exist only to test the benchmarks themselves: name -> "module:Class".
INSTRUMENTS = {"synthetic": "benchmarks.instruments:SyntheticEngine"}

# The capabilities each kind of workload needs. Decoding rates need events as the
# tokens are produced ("stream"); a batch is timed from its events the same way.
NEEDS = {
    "prefill": {"greedy"},
    "decode": {"greedy", "stream"},
    "batch": {"greedy", "stream", "batch"},
    "speculative": {"greedy", "stream", "speculative"},
    "suite": set(),  # lmconform check judges what the engine can do
}


@dataclass
class Profile:
    """What timing needs to know of an engine besides its events."""

    encode: Callable[[str], list[int]]  # prompt text -> token ids (no special tokens)
    end_tokens: list[int]  # token ids to ban so generation never stops early
    # A context manager whose ``peak_extra_bytes`` is set on exit; None: not measurable here.
    probe: Callable[[], AbstractContextManager] | None = None
    weight_bytes: int | None = None  # weights held (None: unknown, e.g. another process)
    weight_bytes_per_token: int | None = None  # weights read per decoded token
    versions: dict[str, str] = field(default_factory=dict)  # libraries deciding its speed
    settings: dict[str, Any] = field(default_factory=dict)  # stored with every sample


def split_specs(text: str) -> list[str]:
    """``a,b:k=v,k2=v2,cmd:x`` -> ``["a", "b:k=v,k2=v2", "cmd:x"]``.

    Commas separate engines, except before a bare ``key=value``, which continues the
    previous spec's options (the registry's grammar allows ``NAME:k=v,k2=v2``).
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if specs and "=" in piece and ":" not in piece and not specs[-1].startswith("cmd:"):
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def parse_bench_spec(text: str) -> tuple[EngineSpec, str | None, float]:
    """The engine's spec (instrument names spelled out), its ``name=`` and ``slowdown=``."""
    head, sep, rest = text.strip().partition(":")
    if head in INSTRUMENTS:
        text = INSTRUMENTS[head] + sep + rest
    spec, taken = parse_spec(text).without(*BENCH_OPTIONS)
    check_spec(spec)  # the engine and its own options, now: a typo is not found mid-run
    checks = {"slowdown": number(float, 0, 10), "name": non_empty}
    for key, value in taken.items():
        try:
            checks[key](value)
        except ValueError as error:
            raise EngineUnavailable(f"{text!r}: option {key}={value!r}: {error}") from None
    return spec, taken.get("name"), float(taken.get("slowdown") or 0)


def default_name(spec: EngineSpec) -> str:
    for name, target in INSTRUMENTS.items():
        if spec.target == target:
            return name
    if spec.kind == "module":
        return getattr(engine_class(spec), "name", spec.target)
    return spec.target if spec.kind == "builtin" else f"cmd:{spec.target}"


def open_adapter(spec: EngineSpec, model: str):
    """The adapter for ``spec`` with ``model``; instruments load nothing, so take any name."""
    if spec.target in INSTRUMENTS.values():
        check_spec(spec)  # option names and values, as open_engine checks them
        return engine_class(spec)(ModelSource(model, "builtin"), **spec.options)
    return open_engine(spec, model)


@dataclass
class TimedEngine:
    """An engine as a run knows it: its history name and spec, then (after ``load``) the
    opened adapter and its timing profile. Specs are parsed at once, engines opened late,
    so a bad spec is a usage error and an engine that cannot open is reported by the run.
    """

    name: str
    spec: EngineSpec
    model: str
    slowdown: float = 0.0
    adapter: Any = None  # an engines.adapters.base.Engine, once loaded
    profile: Profile | None = None

    @classmethod
    def from_spec(cls, text: str, model: str) -> TimedEngine:
        """``reference:slowdown=0.05:name=ref`` on ``model``, not opened yet."""
        spec, name, slowdown = parse_bench_spec(text)
        return cls(name or default_name(spec), spec, model, slowdown)

    @classmethod
    def around(cls, adapter, name: str, model: str = "synthetic",
               slowdown: float = 0.0) -> TimedEngine:
        """An adapter the caller built itself (tests), already loaded."""
        spec = EngineSpec(name, "module", f"{type(adapter).__module__}:{type(adapter).__name__}")
        return cls(name, spec, model, slowdown, adapter, profile_for(adapter, model))

    def load(self) -> None:
        """Open the engine (loads its model): ``EngineUnavailable`` says why it cannot."""
        if self.adapter is not None:
            return
        adapter = open_adapter(self.spec, self.model)
        try:
            self.profile = profile_for(adapter, self.model)
        except BaseException:
            adapter.close()
            raise
        self.adapter = adapter

    # -- what the workloads ask --------------------------------------------------------

    def unsupported(self, kind: str) -> str | None:
        """Why this engine cannot run a workload of ``kind``, or None if it can."""
        missing = sorted(NEEDS[kind] - set(self.adapter.capabilities))
        if missing:
            return f"{self.name} lacks the capabilities {', '.join(missing)}"
        if kind == "batch" and not hasattr(self.adapter, "stream_batch"):
            return f"{self.name} returns a batch only when it is done (no stream_batch)"
        return None

    def encode(self, text: str) -> list[int]:
        return self.profile.encode(text)

    def request(self, prompt: list[int], max_tokens: int, draft: str | None = None,
                num_draft_tokens: int = 3) -> GenerateRequest:
        """A greedy request for exactly ``max_tokens`` tokens (end tokens banned)."""
        return GenerateRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            processors=self._ban_end_tokens(),
            draft=DraftSettings(draft, num_draft_tokens) if draft else None,
        )

    def batch_request(self, prompts: list[list[int]], max_tokens: int) -> BatchRequest:
        return BatchRequest([BatchRow(self.request(p, max_tokens)) for p in prompts])

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        events = self.adapter.generate(request)
        return self._slowed(events)

    def stream_batch(self, request: BatchRequest) -> Iterator[tuple[int, TokenEvent]]:
        return self._slowed(self.adapter.stream_batch(request))

    def engine_times(self) -> EngineTimes | None:
        """The engine's own clock readings of the request just answered, if it gave them.

        Not with a slowdown: that is added on this side, after the engine's clock.
        """
        if self.slowdown:
            return None
        return getattr(self.adapter, "last_times", None)

    @contextmanager
    def peak_memory(self) -> Iterator[dict[str, int | None]]:
        """Yields a dict whose ``"bytes"`` is set on exit: weights plus peak working memory
        in this process, or the engine's own report; None when neither is known."""
        result: dict[str, int | None] = {"bytes": None}
        if self.profile.probe is not None and self.profile.weight_bytes is not None:
            with self.profile.probe() as probe:
                yield result
            result["bytes"] = self.profile.weight_bytes + probe.peak_extra_bytes
            return
        yield result
        times = self.engine_times()
        if times is not None:
            result["bytes"] = times.usage.peak_memory_bytes

    # -- what the runner stores --------------------------------------------------------

    def versions(self) -> dict[str, str]:
        described = self.adapter.describe().get("version", "unknown")
        return {self.name: str(described), **self.profile.versions}

    def settings(self) -> dict[str, Any]:
        settings = {
            "spec": self.spec.text,
            "weight_bytes_per_token": self.profile.weight_bytes_per_token,
            "timed_by": "engine clock" if getattr(self.adapter, "timed", False) else "arrival",
            **self.profile.settings,
        }
        if self.slowdown:
            settings["slowdown"] = self.slowdown
        return settings

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()

    # -- pieces ------------------------------------------------------------------------

    def _ban_end_tokens(self) -> ProcessorSettings:
        if "logit_bias" not in self.adapter.capabilities:
            return ProcessorSettings()  # the workload checks the length it got
        return ProcessorSettings(logit_bias={t: float("-inf") for t in self.profile.end_tokens})

    def _slowed(self, events):
        if not self.slowdown:
            return events
        from benchmarks.instruments import slowed

        return slowed(events, self.slowdown)


def open_timed(text: str, model: str) -> TimedEngine:
    """Open the engine of a bench spec (``reference:slowdown=0.05:name=ref``) on ``model``."""
    engine = TimedEngine.from_spec(text, model)
    engine.load()
    return engine


# --- timing profiles, by what the adapter holds ---------------------------------------


def profile_for(adapter, model: str) -> Profile:
    own = getattr(adapter, "timing_profile", None)
    if own is not None:
        return own()
    tokenizer = reference_tokenizer(model)
    base = Profile(
        encode=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        end_tokens=sorted(int(t) for t in tokenizer.eos_token_ids),
    )
    held = getattr(adapter, "model", None)
    if _is_mlx_model(held):
        return mlx_profile(base, held)
    if _is_torch_model(held):
        return torch_profile(base, held)
    return base


@cache
def reference_tokenizer(model: str):
    """The reference's tokenizer of a built-in model (the suite tokenizes every prompt)."""
    import reference

    return reference.load(model)[1]


def _is_mlx_model(model) -> bool:
    if "mlx.nn" not in sys.modules:
        return False
    return isinstance(model, importlib.import_module("mlx.nn").Module)


def _is_torch_model(model) -> bool:
    if "torch" not in sys.modules:
        return False
    return isinstance(model, importlib.import_module("torch").nn.Module)


def mlx_weight_bytes(model) -> tuple[int, int]:
    """(bytes held, bytes read per decoded token) of an MLX model's parameters.

    A tied head reads the whole embedding matrix for every token; an untied model
    reads one row of the embedding (negligible) and the whole ``lm_head``.
    """
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    held = sum(v.nbytes for v in params.values())
    tied = not any(k.startswith("lm_head.") for k in params)
    embedding = sum(v.nbytes for k, v in params.items() if ".embed_tokens." in k)
    return held, held if tied else held - embedding


def mlx_profile(base: Profile, model) -> Profile:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    held, per_token = mlx_weight_bytes(model)
    dtypes = sorted({str(v.dtype) for _, v in tree_flatten(model.parameters())})
    return Profile(base.encode, base.end_tokens, memory.MLXProbe, held, per_token,
                   {"mlx": mx.__version__}, {"dtypes": dtypes})


def torch_profile(base: Profile, model) -> Profile:
    import torch

    # parameters() yields a tied embedding/head once.
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = held
    if not model.config.tie_word_embeddings:
        embedding = model.get_input_embeddings().weight
        per_token = held - embedding.numel() * embedding.element_size()
    return Profile(base.encode, base.end_tokens, memory.RSSProbe, held, per_token,
                   {"torch": torch.__version__}, {"dtype": str(model.dtype)})
