"""Timing adapters: one small interface, implemented for each kind of engine.

An adapter does not time anything. It generates, and calls ``on_token`` the moment
each token is available (``on_step`` once per batched step); the workload owns the
clock (see ``workloads.py``). That keeps the timing code identical for every engine
and lets a wrapper (``Slowdown``) change an engine's speed without touching it.

Adapters:

- ``MLXAPIEngine``      any module with mlx-lm's generation API: ``reference`` or
                        ``mlx_lm`` (the reference was written to be a drop-in match)
- ``TransformersEngine`` Hugging Face transformers on PyTorch, CPU
- ``SyntheticEngine``   burns known CPU time instead of computing: cheap, predictable
                        timings for testing the runner, the history and the statistics
- ``Slowdown``          wraps any engine and adds a fixed fraction to each decode step

Engine specs on the command line are ``KIND[:option=value...]``, e.g. ``mlx-lm`` or
``synthetic:step_ms=2:slowdown=0.15:name=synthetic``; see ``make_engine``.
"""

from __future__ import annotations

import copy
import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import lru_cache

from benchmarks import memory
from benchmarks.model_folders import exported_folder, gguf_file

OnToken = Callable[..., None]  # on_token(from_draft: bool = False)
OnStep = Callable[[int], None]  # on_step(tokens produced by this batched step)

# What to install when a peer engine's import fails.
INSTALL_HINTS = {
    "mlx-lm": "pip install 'lmconform[peers]'  (mlx-lm)",
    "transformers": "pip install 'lmconform[peers]'  (torch, transformers)",
}

# Built-in draft models; any other model drafts with its own first layers.
DRAFTS = {"dummy": "dummy-draft"}


def draft_layers(num_layers: int) -> int:
    """How many leading layers make the self-draft: an eighth, at least one."""
    return max(1, num_layers // 8)


class BenchEngine(ABC):
    """The interface a workload times. ``load`` does the slow part, once."""

    name: str
    model_name: str

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Package versions that decide this engine's speed, for the fingerprint."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of weights held in memory."""

    @abstractmethod
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read to decode one token (the roofline's denominator)."""

    @abstractmethod
    def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        on_token: OnToken,
        num_draft_tokens: int | None = None,
    ) -> None:
        """Greedy-generate exactly ``max_tokens`` tokens (no early stop on EOS).

        With ``num_draft_tokens`` the engine decodes speculatively with its draft model.
        """

    def generate_batch(self, prompts: list[list[int]], max_tokens: int, on_step: OnStep) -> None:
        raise NotImplementedError(f"{self.name} has no batched generation")

    @abstractmethod
    def memory_probe(self) -> AbstractContextManager:
        """A context manager whose ``peak_extra_bytes`` is set on exit."""

    def supports(self, kind: str) -> bool:
        return kind in ("prefill", "decode")

    def settings(self) -> dict:
        """Engine parameters stored with every sample (dtype, draft, options)."""
        return {}


# --- MLX-API engines: reference and mlx-lm ------------------------------------------


def _mlx_weight_bytes(model) -> tuple[int, int]:
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


def _first_layers(model, keep: int):
    """A shallow copy of ``model`` that runs only its first ``keep`` layers.

    The copy shares the weight arrays (no extra memory); only the layer list is new.
    """
    draft = copy.copy(model)
    draft.model = copy.copy(model.model)
    draft.model.layers = model.model.layers[:keep]
    return draft


class MLXAPIEngine(BenchEngine):
    """An engine exposing mlx-lm's API: ``load``, ``stream_generate``, ``BatchGenerator``."""

    def __init__(self, module: str, model_name: str, name: str | None = None):
        self.module_name = module
        self.model_name = model_name
        self.name = name or module.replace("_", "-")
        self._draft = None

    def load(self) -> None:
        import mlx.core as mx

        self.mx = mx
        self.api = importlib.import_module(self.module_name)
        # mlx-lm keeps BatchGenerator in its ``generate`` module; the reference exports it.
        self.batch_generator = getattr(self.api, "BatchGenerator", None)
        if self.batch_generator is None:
            try:
                generate_module = importlib.import_module(self.module_name + ".generate")
                self.batch_generator = getattr(generate_module, "BatchGenerator", None)
            except ImportError:
                pass
        self.model, self.tokenizer = self._load(self.model_name)
        self._held, self._per_token = _mlx_weight_bytes(self.model)
        eos = getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id]
        self.eos_ids = sorted(int(i) for i in eos)
        self._ban_eos_bias = None

    def _load(self, model_name: str):
        # The reference loads built-in names itself; mlx-lm gets the exported folder.
        if self.module_name == "reference":
            return self.api.load(model_name)
        return self.api.load(str(exported_folder(model_name)))

    def versions(self) -> dict[str, str]:
        version = getattr(self.api, "__version__", None)
        if version is None:  # the reference is versioned with the lmconform distribution
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as dist_version

            try:
                version = dist_version("lmconform")
            except PackageNotFoundError:
                version = "source"
        return {self.name: str(version), "mlx": self.mx.__version__}

    @lru_cache(maxsize=8)  # noqa: B019 - engines live for the whole run anyway
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def weight_bytes(self) -> int:
        return self._held

    def weight_bytes_per_token(self) -> int:
        return self._per_token

    def supports(self, kind: str) -> bool:
        if kind == "batch":
            return self.batch_generator is not None
        return kind in ("prefill", "decode", "speculative")

    def memory_probe(self):
        return memory.MLXProbe()

    def settings(self) -> dict:
        dtypes = sorted({str(p.dtype) for p in _leaves(self.model.parameters())})
        return {"module": self.module_name, "dtypes": dtypes,
                "weight_bytes_per_token": self._per_token}

    def _ban_eos(self, tokens, logits):
        """Logits processor: end-of-sequence is never chosen, so length is exact."""
        if self._ban_eos_bias is None or self._ban_eos_bias.shape[-1] != logits.shape[-1]:
            bias = [0.0] * logits.shape[-1]
            for i in self.eos_ids:
                bias[i] = float("-inf")
            self._ban_eos_bias = self.mx.array(bias, dtype=logits.dtype)
        return logits + self._ban_eos_bias

    def draft_model(self):
        if self._draft is None:
            if self.model_name in DRAFTS:
                self._draft, _ = self._load(DRAFTS[self.model_name])
            else:
                self._draft = _first_layers(self.model, draft_layers(len(self.model.layers)))
        return self._draft

    def generate(self, prompt, max_tokens, on_token, num_draft_tokens=None) -> None:
        extra = {}
        if num_draft_tokens:
            extra = {"draft_model": self.draft_model(), "num_draft_tokens": num_draft_tokens}
        produced = 0
        for response in self.api.stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens,
            logits_processors=[self._ban_eos], **extra,
        ):
            produced += 1
            on_token(bool(response.from_draft))
        if produced != max_tokens:
            raise RuntimeError(f"{self.name} produced {produced} tokens, asked {max_tokens}")

    def generate_batch(self, prompts, max_tokens, on_step) -> None:
        size = len(prompts)
        # All prompts are prefilled together, so the first step yields one token per
        # sequence; no stop tokens, so every sequence runs to max_tokens.
        generator = self.batch_generator(
            self.model, max_tokens=max_tokens, stop_tokens=None,
            prefill_batch_size=size, completion_batch_size=size,
        )
        try:
            generator.insert(prompts, [max_tokens] * size)
            while responses := generator.next_generated():
                on_step(len(responses))
        finally:
            generator.close()


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


# --- transformers on PyTorch --------------------------------------------------------


class _CallbackStreamer:
    """transformers streamer calling ``on_token`` per generated token.

    ``generate`` first puts the prompt, then each new token (a batch: one per row);
    assisted generation puts all tokens accepted in a round at once, of which all
    but the last came from the draft.
    """

    def __init__(self, on_token: OnToken | None = None, on_step: OnStep | None = None):
        self.on_token, self.on_step = on_token, on_step
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.on_step is not None:
            self.on_step(int(value.shape[0]) if value.dim() else 1)
            return
        count = int(value.numel())
        for i in range(count):
            self.on_token(i < count - 1)

    def end(self) -> None:
        pass


class TransformersEngine(BenchEngine):
    """Hugging Face transformers, PyTorch on CPU, greedy ``generate``."""

    def __init__(self, model_name: str, name: str = "transformers", threads: int | None = None):
        self.model_name = model_name
        self.name = name
        # PyTorch's thread count (default: its own choice, one per core). MLX runs on one
        # CPU thread, and PyTorch's OpenMP barriers stall badly when another process or
        # the hypervisor takes a core away, so ``threads=1`` is the like-for-like setting.
        self.threads = threads
        self._draft = None

    def load(self) -> None:
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        # The process default, restored for each call: another engine may have changed it.
        self.threads = self.threads or torch.get_num_threads()
        gguf = gguf_file(self.model_name)
        if gguf is not None:  # transformers de-quantizes GGUF to float32 itself
            source, extra = str(gguf.parent), {"gguf_file": gguf.name}
        else:
            source, extra = str(exported_folder(self.model_name)), {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(source, **extra).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [eos]

    def versions(self) -> dict[str, str]:
        return {self.name: self.transformers.__version__, "torch": self.torch.__version__}

    @lru_cache(maxsize=8)  # noqa: B019
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def weight_bytes(self) -> int:
        # parameters() yields a tied embedding/head once.
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def weight_bytes_per_token(self) -> int:
        held = self.weight_bytes()
        if self.model.config.tie_word_embeddings:
            return held
        embedding = self.model.get_input_embeddings().weight
        return held - embedding.numel() * embedding.element_size()

    def supports(self, kind: str) -> bool:
        return kind in ("prefill", "decode", "batch", "speculative")

    def memory_probe(self):
        return memory.RSSProbe()

    def settings(self) -> dict:
        return {"dtype": str(self.model.dtype), "threads": self.threads,
                "weight_bytes_per_token": self.weight_bytes_per_token()}

    def draft_model(self):
        if self._draft is None:
            if self.model_name in DRAFTS:
                folder = exported_folder(DRAFTS[self.model_name])
                auto = self.transformers.AutoModelForCausalLM
                self._draft = auto.from_pretrained(str(folder)).eval()
            else:
                config = copy.deepcopy(self.model.config)
                config.num_hidden_layers = draft_layers(config.num_hidden_layers)
                draft = self.transformers.AutoModelForCausalLM.from_config(config)
                # Layers beyond the draft's depth are simply not loaded.
                draft.load_state_dict(self.model.state_dict(), strict=False)
                self._draft = draft.to(self.model.dtype).eval()
        return self._draft

    def _generate(self, input_ids, max_tokens, streamer, **extra) -> None:
        torch = self.torch
        torch.set_num_threads(self.threads)  # per call: the setting is process-wide
        with torch.inference_mode():
            self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,  # suppresses EOS: the length is exact
                eos_token_id=self.eos_ids,
                pad_token_id=self.eos_ids[0],
                streamer=streamer,
                **extra,
            )

    def generate(self, prompt, max_tokens, on_token, num_draft_tokens=None) -> None:
        extra = {}
        if num_draft_tokens:
            extra = {"assistant_model": self.draft_model()}
            self.draft_model().generation_config.num_assistant_tokens = num_draft_tokens
            self.draft_model().generation_config.num_assistant_tokens_schedule = "constant"
        produced = []
        streamer = _CallbackStreamer(on_token=lambda d=False: (produced.append(1), on_token(d)))
        self._generate(self.torch.tensor([prompt]), max_tokens, streamer, **extra)
        if len(produced) != max_tokens:
            raise RuntimeError(f"{self.name} produced {len(produced)} tokens, asked {max_tokens}")

    def generate_batch(self, prompts, max_tokens, on_step) -> None:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("batched prompts must have equal lengths (no padding here)")
        self._generate(self.torch.tensor(prompts), max_tokens, _CallbackStreamer(on_step=on_step))


# --- synthetic engine and the slowdown wrapper -------------------------------------------


def burn_cpu(seconds: float) -> None:
    """Busy-work for ``seconds`` of this thread's CPU time.

    Work measured in CPU time, not wall time, behaves like a compute-bound engine:
    when another process takes half the CPU, the step takes twice as long on the wall
    clock, for the synthetic engine and its slowed copy alike, so their *ratio*
    survives a loaded machine. (Sleeping does not: each extra wake-up on a busy
    machine costs a scheduling delay that has nothing to do with its length.)
    """
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


class SyntheticEngine(BenchEngine):
    """An engine that burns a known amount of CPU time instead of computing logits.

    Prefill costs ``prefill_us`` microseconds of CPU per prompt token, each decode step
    ``step_ms`` milliseconds (a batched step grows by ``batch_growth`` per extra
    sequence), and every generated token appends ``kv_bytes`` of "KV cache" (a NumPy
    buffer, so the memory probe has something real to see). Speculative rounds cost
    ``1 + 0.25 * num_draft_tokens`` steps and yield two tokens, one from the draft.
    """

    def __init__(
        self,
        model_name: str = "synthetic",
        name: str = "synthetic",
        step_ms: float = 2.0,
        prefill_us: float = 50.0,
        batch_growth: float = 0.1,
        kv_bytes: int = 16384,
        weight_mb: float = 10.0,
    ):
        self.model_name, self.name = model_name, name
        self.step_s, self.prefill_s = step_ms / 1e3, prefill_us / 1e6
        self.batch_growth, self.kv_bytes = batch_growth, int(kv_bytes)
        self.weight_mb = weight_mb

    def load(self) -> None:
        pass

    def versions(self) -> dict[str, str]:
        return {self.name: "synthetic"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def weight_bytes(self) -> int:
        return int(self.weight_mb * 1e6)

    def weight_bytes_per_token(self) -> int:
        return self.weight_bytes()

    def supports(self, kind: str) -> bool:
        return True

    def memory_probe(self):
        return memory.TracemallocProbe()

    def settings(self) -> dict:
        return {"step_s": self.step_s, "prefill_s": self.prefill_s,
                "weight_bytes_per_token": self.weight_bytes_per_token()}

    def generate(self, prompt, max_tokens, on_token, num_draft_tokens=None) -> None:
        import numpy as np

        cache = []
        burn_cpu(self.prefill_s * len(prompt))
        on_token(False)
        produced = 1
        while produced < max_tokens:
            if num_draft_tokens:
                burn_cpu(self.step_s * (1 + 0.25 * num_draft_tokens))
                tokens = [True, False][: max_tokens - produced]
            else:
                burn_cpu(self.step_s)
                tokens = [False]
            for from_draft in tokens:
                cache.append(np.ones(self.kv_bytes, dtype=np.uint8))
                on_token(from_draft)
                produced += 1

    def generate_batch(self, prompts, max_tokens, on_step) -> None:
        burn_cpu(self.prefill_s * sum(len(p) for p in prompts))
        on_step(len(prompts))
        for _ in range(max_tokens - 1):
            burn_cpu(self.step_s * (1 + self.batch_growth * (len(prompts) - 1)))
            on_step(len(prompts))


class Slowdown(BenchEngine):
    """Wraps an engine and makes each decode step ``fraction`` slower.

    After each token (or batch step) following the first, it burns ``fraction`` times
    the CPU time the process spent on that step, before the workload's clock sees the
    token. Prefill (up to the first token) is left alone. For an engine computing on
    one thread (the synthetic engine; MLX on CPU) that is ``fraction`` of the step's
    duration. This is how the tests prove that a real 15% decode regression is
    flagged and a 2% one is not.
    """

    def __init__(self, inner: BenchEngine, fraction: float, name: str | None = None):
        if fraction < 0:
            raise ValueError(f"slowdown fraction must be >= 0, got {fraction}")
        self.inner, self.fraction = inner, fraction
        self.name = name or inner.name
        self.model_name = inner.model_name

    def _slowed(self, callback: Callable) -> Callable:
        last_cpu: list[float] = []

        def wrapped(*args) -> None:
            if last_cpu:
                burn_cpu(self.fraction * (time.process_time() - last_cpu[0]))
            callback(*args)
            last_cpu[:] = [time.process_time()]

        return wrapped

    def generate(self, prompt, max_tokens, on_token, num_draft_tokens=None) -> None:
        self.inner.generate(prompt, max_tokens, self._slowed(on_token), num_draft_tokens)

    def generate_batch(self, prompts, max_tokens, on_step) -> None:
        self.inner.generate_batch(prompts, max_tokens, self._slowed(on_step))

    def load(self) -> None:
        self.inner.load()

    def versions(self) -> dict[str, str]:
        return self.inner.versions()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes()

    def weight_bytes_per_token(self) -> int:
        return self.inner.weight_bytes_per_token()

    def supports(self, kind: str) -> bool:
        return self.inner.supports(kind)

    def memory_probe(self):
        return self.inner.memory_probe()

    def settings(self) -> dict:
        return {**self.inner.settings(), "slowdown": self.fraction}


# --- engine specs ---------------------------------------------------------------------

ENGINE_KINDS = ("reference", "mlx-lm", "transformers", "synthetic")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``KIND[:key=value...]`` -> (kind, options)."""
    kind, *parts = spec.strip().split(":")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"engine option {part!r} in {spec!r} must look like key=value")
        options[key] = value
    return kind, options


def make_engine(spec: str, model_name: str) -> BenchEngine:
    """Build an (unloaded) engine from a spec such as ``mlx-lm`` or ``synthetic:step_ms=1``.

    Options every engine takes: ``name=`` (the name recorded in the history; runs are
    compared by name) and ``slowdown=`` (wrap in ``Slowdown``; the name stays the
    same, so a slowed run compares against a plain one). ``transformers`` takes
    ``threads=``; ``synthetic`` takes the ``SyntheticEngine`` parameters.
    """
    kind, options = parse_spec(spec)
    name = options.pop("name", None)
    slowdown = float(options.pop("slowdown", 0) or 0)
    if kind == "reference":
        engine: BenchEngine = MLXAPIEngine("reference", model_name, name="reference")
    elif kind == "mlx-lm":
        engine = MLXAPIEngine("mlx_lm", model_name, name="mlx-lm")
    elif kind == "transformers":
        threads = options.pop("threads", None)
        engine = TransformersEngine(model_name, threads=int(threads) if threads else None)
    elif kind == "synthetic":
        numeric = {key: float(value) for key, value in options.items()}
        options = {}
        try:
            engine = SyntheticEngine(model_name, **numeric)
        except TypeError as error:
            raise ValueError(f"bad synthetic engine option in {spec!r}: {error}") from None
    else:
        raise ValueError(f"unknown engine {kind!r}; choose from: {', '.join(ENGINE_KINDS)}")
    if options:
        raise ValueError(f"engine {kind!r} takes no options {sorted(options)}")
    if slowdown:
        engine = Slowdown(engine, slowdown)
    if name:
        engine.name = name
    return engine
