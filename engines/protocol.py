"""The engine protocol: what the suite asks an engine, and what the engine answers.

Everything here is plain data (dataclasses of ints, floats, strings, lists)
so that a request or an event can cross a process boundary as JSON: the same
messages serve in-process adapters and engines written in other languages
(see ``serialization.py`` for the JSON form).

Requests are token-level. The suite tokenizes prompts itself with the
reference tokenizer, so an engine is judged on generation, not on its
tokenizer, and every engine sees exactly the same token ids.

Semantics that every engine must follow (they are mlx-lm's):

- The last event of a generation carries ``finish_reason``: ``"stop"`` when
  an end token or stop sequence was produced (that token *is* reported, as its
  own event), ``"length"`` when ``max_tokens`` tokens were produced.
- ``logprob`` is the log-softmax, after logit bias and penalties but before
  temperature and sampling filters, of the token that was chosen.
- ``text`` pieces, joined, equal the decoded tokens (a final end token
  contributes no text); a piece never splits a UTF-8 character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOL_VERSION = 1

# What an engine may declare it can do. A case needing a capability the engine
# lacks is reported "unsupported", never "fail".
CAPABILITIES = {
    "greedy": "argmax decoding",
    "stream": "events are delivered while generating (not only at the end)",
    "logprobs": "chosen-token and top-k log-probabilities",
    "sampling": "temperature, top-k, top-p, min-p with a seed",
    "logit_bias": "additive logit bias and repetition/presence/frequency penalties",
    "speculative": "speculative decoding with a draft model",
    "input_embeddings": "prompts given as embedding vectors instead of token ids",
    "batch": "several sequences generated together",
    "prompt_cache": "reuse of a cached prompt prefix across requests",
    "rotating_kv": "a bounded KV cache (max_kv_size) keeping 4 sink positions",
    "prefill_chunking": "prompt processed in prefill_step_size chunks",
    "score": "teacher-forced log-probabilities of a given continuation",
}

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplerSettings:
    """How the next token is chosen; ``temp == 0`` is greedy. Names as in mlx-lm."""

    temp: float = 0.0
    top_p: float = 0.0  # 0 or 1 disables the filter
    min_p: float = 0.0
    top_k: int = 0  # 0 disables the filter
    min_tokens_to_keep: int = 1
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temp == 0


@dataclass
class ProcessorSettings:
    """Logit bias and penalties, applied to the logits before sampling (mlx-lm semantics:
    bias first, then repetition, presence and frequency penalties over the last
    ``*_context_size`` tokens of prompt plus output)."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    presence_context_size: int = 20
    frequency_penalty: float | None = None
    frequency_context_size: int = 20

    @property
    def active(self) -> bool:
        penalties = (self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
        return bool(self.logit_bias) or any(p not in (None, 0) for p in penalties)


@dataclass
class DraftSettings:
    """Speculative decoding: ``model`` is a model name, or ``"self"`` for the target itself."""

    model: str
    num_draft_tokens: int = 2


@dataclass
class GenerateRequest:
    """One generation. Give ``prompt`` token ids, or ``prompt_embeddings`` (one vector
    of the model's hidden size per position), or both with equal lengths."""

    prompt: list[int] = field(default_factory=list)
    prompt_embeddings: list[list[float]] | None = None
    max_tokens: int = 16
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    processors: ProcessorSettings = field(default_factory=ProcessorSettings)
    # Token ids that end generation like the model's own end tokens (which always apply).
    stop_tokens: list[int] = field(default_factory=list)
    # Token-id sequences; generation stops once the output ends with one of them.
    stop_sequences: list[list[int]] = field(default_factory=list)
    draft: DraftSettings | None = None
    prefill_step_size: int | None = None
    max_kv_size: int | None = None
    top_logprobs: int = 0
    stream: bool = True
    # Requests sharing a key may reuse each other's KV cache. The prompt is always
    # the full prompt: the engine finds the cached prefix and trims what differs.
    cache_key: str | None = None

    def capabilities_needed(self) -> set[str]:
        """The capabilities an engine must declare to serve this request."""
        needed = {"greedy" if self.sampler.greedy else "sampling"}
        if self.processors.active:
            needed.add("logit_bias")
        if self.draft is not None:
            needed.add("speculative")
        if self.prompt_embeddings is not None:
            needed.add("input_embeddings")
        if self.prefill_step_size is not None:
            needed.add("prefill_chunking")
        if self.max_kv_size is not None:
            needed.add("rotating_kv")
        if self.cache_key is not None:
            needed.add("prompt_cache")
        return needed


@dataclass
class BatchRow:
    """A sequence in a batch. ``insert_at``: generation steps the batch has taken before
    this row joins (continuous batching). Engines that batch statically may ignore it:
    each row's output must equal that row generated alone, whatever the schedule."""

    request: GenerateRequest
    insert_at: int = 0


@dataclass
class BatchRequest:
    rows: list[BatchRow]

    def capabilities_needed(self) -> set[str]:
        needed = {"batch"}
        for row in self.rows:
            needed |= row.request.capabilities_needed()
        return needed


@dataclass
class ScoreRequest:
    """Teacher forcing: the log-probability of each ``continuation`` token after the
    prompt and the continuation tokens before it. Answered with one event per
    continuation token (``finish_reason`` unset)."""

    prompt: list[int]
    continuation: list[int]
    top_logprobs: int = 0

    def capabilities_needed(self) -> set[str]:
        return {"score"}


@dataclass
class TokenEvent:
    """One generated (or scored) token."""

    token: int
    logprob: float | None = None
    # The most likely tokens at this step as (token id, logprob), most likely first.
    top_logprobs: list[tuple[int, float]] | None = None
    text: str = ""
    from_draft: bool | None = None
    finish_reason: str | None = None


@dataclass
class Trace:
    """An engine's full answer to one request: its events, in order."""

    events: list[TokenEvent] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events]

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    def __len__(self) -> int:
        return len(self.events)


class Unsupported(Exception):
    """Raised by an adapter for a request it cannot express (the case becomes 'unsupported')."""


class BadRequest(ValueError):
    """Raised by an adapter for a request that cannot be valid (PROTOCOL.md S6; over JSON
    lines, an ``error`` of kind ``bad_request``). A ``ValueError``, as Python engines
    usually refuse such arguments."""


def request_problem(request: GenerateRequest, vocab_size: int) -> str | None:
    """Why ``request`` cannot be valid on a model of ``vocab_size`` tokens (S6), or None."""
    s = request.sampler
    tokens = [
        *request.prompt,
        *request.stop_tokens,
        *(t for sequence in request.stop_sequences for t in sequence),
        *request.processors.logit_bias,
    ]
    outside = next((t for t in tokens if not 0 <= t < vocab_size), None)
    embeddings = request.prompt_embeddings
    checks = [
        (request.max_tokens < 1, f"max_tokens must be at least 1, got {request.max_tokens}"),
        (not request.prompt and embeddings is None, "the prompt is empty"),
        (
            bool(request.prompt)
            and embeddings is not None
            and len(embeddings) != len(request.prompt),
            "prompt and prompt_embeddings differ in length",
        ),
        (outside is not None, f"token {outside} is outside the vocabulary [0, {vocab_size})"),
        (any(not seq for seq in request.stop_sequences), "an empty stop sequence"),
        (s.temp < 0, f"temp must not be negative, got {s.temp}"),
        (not 0 <= s.top_p <= 1, f"top_p must lie in [0, 1], got {s.top_p}"),
        (not 0 <= s.min_p <= 1, f"min_p must lie in [0, 1], got {s.min_p}"),
        (s.top_k < 0, f"top_k must not be negative, got {s.top_k}"),
        (
            s.min_tokens_to_keep < 1,
            f"min_tokens_to_keep must be at least 1, got {s.min_tokens_to_keep}",
        ),
        (
            request.top_logprobs < 0,
            f"top_logprobs must not be negative, got {request.top_logprobs}",
        ),
        (
            request.prefill_step_size is not None and request.prefill_step_size < 1,
            f"prefill_step_size must be at least 1, got {request.prefill_step_size}",
        ),
        (
            request.max_kv_size is not None and request.max_kv_size < 1,
            f"max_kv_size must be at least 1, got {request.max_kv_size}",
        ),
        (
            request.draft is not None and request.draft.num_draft_tokens < 1,
            "num_draft_tokens must be at least 1",
        ),
    ]
    return next((why for broken, why in checks if broken), None)


class ProtocolError(Exception):
    """An engine's answer (or a message) breaks the protocol."""
