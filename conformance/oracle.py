"""The oracle: the reference engine as the source of truth for one model.

It tokenizes and embeds prompts for the catalogue, answers requests (each
answer computed once and reused by every engine compared against it), and
decodes tokens for diagnostics. Reference answers always carry the top
``REFERENCE_TOP`` logprobs, enough to find the reference's logprob of
whatever token an engine chose instead, and so to tell a near-tie from a bug.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from conformance.profiles import PrecisionProfile, profile_for_model
from engines.adapters.base import event_from_logprobs
from engines.protocol import GenerateRequest, SamplerSettings, ScoreRequest, Trace
from engines.registry import open_engine
from engines.serialization import dumps

REFERENCE_TOP = 20


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2 style) spell byte b as one printable character:
    printable Latin-1 bytes as themselves, the rest as code points from 256 upward."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


BYTE_OF_CHAR = _byte_level_chars()


class ReferenceOracle:
    def __init__(self, model: str, engine=None):
        self.model = model
        self.engine = engine if engine is not None else open_engine("reference", model)
        self.tokenizer = self.engine.tokenizer
        self.end_tokens: set[int] = set(self.tokenizer.eos_token_ids)
        self.vocab_size: int = self.engine.vocab_size
        self._answers: dict[str, Trace] = {}

    def default_profile(self, override: str | None = None) -> PrecisionProfile:
        return profile_for_model(self.model, override)

    # -- what the catalogue needs (catalogue.Oracle) ------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def embed(self, tokens: list[int]) -> np.ndarray:
        return self.engine.embed(tokens)

    def greedy_tokens(self, request: GenerateRequest) -> list[int]:
        return self.answer(request).tokens

    # -- answers ---------------------------------------------------------------------------

    def answer(self, request: GenerateRequest, top: int = REFERENCE_TOP) -> Trace:
        """The reference's streamed answer to ``request``, with ``top`` logprobs per step."""
        request = replace(request, top_logprobs=top, stream=True)
        key = dumps(request)
        if key not in self._answers:
            self._answers[key] = Trace(list(self.engine.generate(request)))
        return self._answers[key]

    def answer_score(self, request: ScoreRequest) -> Trace:
        request = replace(request, top_logprobs=REFERENCE_TOP)
        key = "score:" + dumps(request)
        if key not in self._answers:
            self._answers[key] = Trace(self.engine.score(request))
        return self._answers[key]

    def continuation(self, request: GenerateRequest, tokens: list[int]) -> Trace:
        """The reference teacher-forced on ``tokens`` (an engine's greedy answer to
        ``request``): at each step, the reference's logprobs at the prefix the engine
        had produced, with ``REFERENCE_TOP`` top logprobs. ``event.token`` is the
        engine's token; the comparator resumes on this after a near-tie.

        A request whose settings do not shape the logits goes through the reference's
        ``score`` path (one forward pass over prompt + tokens). Logit bias,
        penalties, a bounded KV cache or an embeddings prompt do shape them, so those
        are decoded with the request's own settings and a sampler that picks the
        engine's tokens. A draft model and a cache key change nothing in a correct
        greedy answer, and are left out.
        """
        key = f"continuation:{dumps(request)}:{list(tokens)}"
        if key not in self._answers:
            plain = (
                not request.processors.active
                and request.max_kv_size is None
                and request.prompt_embeddings is None
            )
            if plain:
                scored = ScoreRequest(list(request.prompt), list(tokens), REFERENCE_TOP)
                self._answers[key] = Trace(self.engine.score(scored))
            else:
                self._answers[key] = Trace(self._forced_decoding(request, list(tokens)))
        return self._answers[key]

    def _forced_decoding(self, request: GenerateRequest, tokens: list[int]):
        import mlx.core as mx  # only the live reference needs MLX (snapshots do not)

        plain = replace(request, draft=None, cache_key=None, sampler=SamplerSettings())
        kwargs = self.engine.generation_kwargs(plain)
        calls = 0

        def forced(logprobs: mx.array) -> mx.array:
            # generate_step asks for one token beyond max_tokens (it computes ahead).
            nonlocal calls
            token = tokens[min(calls, len(tokens) - 1)]
            calls += 1
            return mx.array([token], dtype=mx.int32)

        kwargs["sampler"] = forced
        steps = self.engine.api.generate_step(
            self.engine.prompt_array(plain), self.engine.model, max_tokens=len(tokens), **kwargs
        )
        return [
            event_from_logprobs(
                token, np.array(logprobs.astype(mx.float32)), self.vocab_size, REFERENCE_TOP
            )
            for token, logprobs in steps
        ]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def token_text(self, token: int) -> str:
        """A token as a human should see it: its text, or its bytes when it is only part
        of a UTF-8 character (which decodes to a bare replacement character)."""
        text = self.decode([token])
        if "\ufffd" not in text:
            return text
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        raw = (
            bytes(BYTE_OF_CHAR[ch] for ch in piece)
            if all(ch in BYTE_OF_CHAR for ch in piece)
            else None
        )
        return f"<{raw.hex(' ')}>" if raw is not None else piece

    def close(self) -> None:
        self.engine.close()
