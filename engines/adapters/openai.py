"""``openai:URL``: an engine behind an OpenAI-compatible HTTP API (vLLM, SGLang, TGI,
llama.cpp's server, Ollama, LM Studio, ``mlx_lm.server``, ``lmconform serve``).

    --engine "openai:http://127.0.0.1:8080/v1"
    --engine "openai:http://127.0.0.1:8080/v1:model=NAME:api_key_env=VAR:chat=1:timeout=60"

The suite's requests are token ids; this adapter turns each into a
``/v1/completions`` request (or ``/v1/chat/completions``, with ``chat=1``, for a
prompt that is exactly the chat template around one user message, so that the
server applies its own template) and the answer back into token events:

- the prompt goes as token ids where the server accepts them, otherwise as text,
  and then the server's reported prompt token count must equal the reference's;
- ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``logit_bias`` map one to one;
  ``top_k`` and ``min_p`` go as the extension fields vLLM, llama.cpp and mlx_lm
  share; stop tokens go as ``stop_token_ids`` (vLLM's extension) and as ``stop``
  strings, stop sequences as ``stop`` strings;
- the generated tokens are read from the logprobs: an ``id`` field where the server
  gives one, ``token_id:N`` names (asked for with vLLM's
  ``return_tokens_as_token_ids``), else the token's ``bytes`` or its name, mapped to
  an id through the model's vocabulary (byte-level pieces and ``bytes:\\xNN`` included).

A capability probe at start-up asks the server a few two-token questions and
declares what it answered: ``logprobs`` (top entries), ``stream`` (streamed
chunks that name their tokens), ``score`` (``echo`` with prompt logprobs). What the
API cannot express (speculative decoding, input embeddings, prompt caches,
bounded KV caches, prefill chunking, batches, windowed penalties) is never declared,
so those cases are "unsupported", never failed.

A refused connection, an HTTP error, a malformed or truncated answer or a
timeout fails the case at hand with the server's answer (``ServerFailure``); the
run goes on. A server that cannot be reached says so in as many words.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engines.adapters.base import Engine
from engines.adapters.line_process import EngineFailure
from engines.byte_level import BYTE_OF_CHAR
from engines.deadline import CaseTimeout
from engines.inputs import flag, non_empty, seconds, set_variable
from engines.models import ModelSource
from engines.protocol import (
    BatchRequest,
    GenerateRequest,
    ProtocolError,
    ScoreRequest,
    TokenEvent,
    Unsupported,
)

DEFAULT_TIMEOUT_S = 120.0
ANSWER_EXCERPT = 400  # characters of a server's answer quoted in a failure
PROBE_TOP = 2
# Both spellings of "give me logprobs": the completions API's integer, and the chat
# API's boolean with top_logprobs (which mlx_lm.server takes for completions too).
LOGPROB_STYLES = ("count", "flag")


class ServerFailure(EngineFailure):
    """The server's answer was an HTTP error, malformed, truncated, or not there at all."""


class ServerUnreachable(ServerFailure):
    """No connection could be made: the server is not running, or the URL is wrong."""


class ServerTimeout(CaseTimeout):
    """The server did not answer within the adapter's timeout."""


# -- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the API lives: ``http://host:port/v1`` split for ``http.client``."""

    url: str
    scheme: str
    host: str
    port: int
    prefix: str  # the path before /completions, e.g. "/v1"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8080/v1")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url.rstrip("/"), parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


class HttpClient:
    """JSON over HTTP with the standard library: one connection per request, every wait
    bounded by ``timeout`` seconds, every failure a ``ServerFailure`` saying what happened."""

    def __init__(self, endpoint: Endpoint, timeout: float, api_key: str | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def get(self, path: str) -> Any:
        with self._exchange("GET", path, None) as response:
            return self._json(path, response)

    def post(self, path: str, body: dict) -> Any:
        with self._exchange("POST", path, body) as response:
            return self._json(path, response)

    def post_stream(self, path: str, body: dict) -> Iterator[dict]:
        """The ``data:`` payloads of a server-sent event stream, up to ``[DONE]``.

        Raises ``ServerFailure`` if the stream ends without ``[DONE]``: the caller decides
        whether what came before is a whole answer."""
        other = []  # what came that is not an event, quoted if no [DONE] comes
        with self._exchange("POST", path, body) as response:
            for line in self._lines(path, response):
                if not line.startswith("data:"):
                    # Comments (": keepalive") and blank separators are part of the format.
                    if line.strip() and not line.startswith(":"):
                        other.append(line)
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    return
                try:
                    payload = json.loads(data)
                except json.JSONDecodeError as error:
                    raise ServerFailure(
                        f"malformed event from POST {self.endpoint.prefix}{path}: {error}; "
                        f"the server sent {excerpt(data)!r}"
                    ) from None
                if isinstance(payload, dict) and "error" in payload:
                    raise ServerFailure(
                        f"the server reported an error mid-stream: {excerpt(json.dumps(payload))}"
                    )
                yield payload
        stray = f"; besides events it sent {excerpt(' '.join(other))!r}" if other else ""
        raise ServerFailure(
            f"the event stream of POST {self.endpoint.prefix}{path} ended without [DONE]{stray}"
        )

    # -- the pieces ---------------------------------------------------------------------------

    def _exchange(self, method: str, path: str, body: dict | None):
        """An open response with status 200; anything else becomes a ``ServerFailure``."""
        target = self.endpoint.prefix + path
        cls = (
            http.client.HTTPSConnection
            if self.endpoint.scheme == "https"
            else http.client.HTTPConnection
        )
        connection = cls(self.endpoint.host, self.endpoint.port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, target, body=payload, headers=self.headers)
            response = connection.getresponse()
        except (ConnectionRefusedError, socket.gaierror) as error:
            connection.close()
            raise ServerUnreachable(
                f"the server at {self.endpoint.url} is not reachable ({error}): "
                "is it running, and is the URL right?"
            ) from None
        except TimeoutError:
            connection.close()
            raise ServerTimeout(
                f"{method} {target}: no answer from the server within {self.timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ServerFailure(
                f"{method} {target} failed: {type(error).__name__}: {error}"
            ) from None
        if response.status != 200:
            text = self._read(method, target, response)
            connection.close()
            raise ServerFailure(
                f"{method} {target} answered HTTP {response.status} {response.reason}: "
                f"{excerpt(text)}"
            )
        return _Closing(connection, response)

    @contextmanager
    def _transport_errors(self, target: str, what: str, where: str) -> Iterator[None]:
        """Timeouts and broken connections while ``what`` arrives, as the adapter's errors."""
        try:
            yield
        except TimeoutError:
            raise ServerTimeout(f"{target}: {what} stalled for {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise ServerFailure(
                f"{target}: the connection broke {where} ({type(error).__name__}: {error})"
            ) from None

    def _read(self, method: str, target: str, response) -> str:
        with self._transport_errors(f"{method} {target}", "the answer", "mid-answer"):
            return response.read().decode("utf-8", errors="replace")

    def _json(self, path: str, response) -> Any:
        target = self.endpoint.prefix + path
        text = self._read("request", target, response)
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ServerFailure(
                f"malformed JSON from {target}: {error}; the server sent {excerpt(text)!r}"
            ) from None

    def _lines(self, path: str, response) -> Iterator[str]:
        target = f"POST {self.endpoint.prefix + path}"
        while True:
            with self._transport_errors(target, "the event stream", "mid-stream"):
                raw = response.readline()
            if not raw:
                return
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


class _Closing:
    """A response whose connection is closed when the ``with`` block ends."""

    def __init__(self, connection, response):
        self.connection, self.response = connection, response

    def __enter__(self):
        return self.response

    def __exit__(self, *exc) -> None:
        self.connection.close()


def excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= ANSWER_EXCERPT else text[:ANSWER_EXCERPT] + "..."


# -- token names -> token ids ------------------------------------------------------------------


TOKEN_ID_NAME = re.compile(r"^token_id:(\d+)$")
BYTES_NAME = re.compile(r"^bytes:((?:\\x[0-9a-fA-F]{2})+)$")


class Vocabulary:
    """Maps the ways servers name a token back to its id.

    Servers name tokens by id (``id`` fields, ``token_id:N``), by bytes (``bytes``
    lists, ``bytes:\\xNN`` names), by the vocabulary's own piece (``Ġthe``, as
    mlx_lm.server does) or by the token's text (`` the``, as OpenAI does). A name
    shared by several ids (two pieces that decode alike) cannot be mapped and is
    an error naming the candidates, never a guess.
    """

    def __init__(self, tokenizer, size: int):
        self.size = size
        self.by_piece: dict[str, int] = {}
        self.by_bytes: dict[bytes, set[int]] = {}
        specials = set(tokenizer.all_special_ids)
        for piece, token in tokenizer.get_vocab().items():
            if token >= size:
                continue
            self.by_piece[piece] = token
            if token in specials or not all(c in BYTE_OF_CHAR for c in piece):
                raw = tokenizer.decode([token]).encode()
            else:
                raw = bytes(BYTE_OF_CHAR[c] for c in piece)
            self.by_bytes.setdefault(raw, set()).add(token)

    def token_id(self, entry: dict[str, Any]) -> int:
        """The id of the token a logprobs entry (``id``/``token``/``bytes``) names."""
        given = entry.get("id")
        if isinstance(given, int) and not isinstance(given, bool):
            return self._checked(given)
        name = entry.get("token")
        raw = entry.get("bytes")
        if isinstance(name, str) and (match := TOKEN_ID_NAME.match(name)):
            return self._checked(int(match.group(1)))
        if isinstance(raw, list) and raw and all(isinstance(b, int) for b in raw):
            return self._by_bytes(bytes(raw), name)
        if not isinstance(name, str):
            raise ProtocolError(f"a logprobs entry names no token: {excerpt(json.dumps(entry))}")
        if match := BYTES_NAME.match(name):
            return self._by_bytes(bytes.fromhex(match.group(1).replace("\\x", "")), name)
        if name in self.by_piece:
            return self.by_piece[name]
        return self._by_bytes(name.encode(), name)

    def _by_bytes(self, raw: bytes, name: Any) -> int:
        ids = self.by_bytes.get(raw, set())
        if len(ids) == 1:
            return next(iter(ids))
        if not ids:
            raise ProtocolError(f"token {name!r} (bytes {raw!r}) is not in the model's vocabulary")
        raise ProtocolError(
            f"token {name!r} could be any of ids {sorted(ids)}; "
            "ask the server for token ids (return_tokens_as_token_ids) or bytes"
        )

    def _checked(self, token: int) -> int:
        if not 0 <= token < self.size:
            raise ProtocolError(f"token {token} is outside the vocabulary [0, {self.size})")
        return token


# -- reading answers ---------------------------------------------------------------------------


@dataclass
class TokenInfo:
    """One token as a logprobs section describes it."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def read_logprobs(section: Any, vocabulary: Vocabulary) -> list[TokenInfo]:
    """The tokens of a ``logprobs`` section, in either of the APIs' layouts.

    Completions: ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{name: lp}]}``.
    Chat (and some completions servers): ``{"content": [{"token", "logprob", "top_logprobs"}]}``.
    Top entries are sorted, most likely first (servers do not all sort them).
    """
    if not section:
        return []
    if not isinstance(section, dict):
        raise ProtocolError(f"logprobs is not an object: {excerpt(json.dumps(section))}")
    if isinstance(section.get("content"), list):
        infos = []
        for entry in section["content"]:
            top = [
                (vocabulary.token_id(t), float(t["logprob"]))
                for t in entry.get("top_logprobs") or []
            ]
            infos.append(TokenInfo(vocabulary.token_id(entry), entry.get("logprob"), _sorted(top)))
        return infos
    names = section.get("tokens")
    if not isinstance(names, list):
        raise ProtocolError(
            f"logprobs has neither content nor tokens: {excerpt(json.dumps(section))}"
        )
    values = section.get("token_logprobs") or [None] * len(names)
    tops = section.get("top_logprobs") or [None] * len(names)
    infos = []
    for name, value, top in zip(names, values, tops, strict=False):
        pairs = [(vocabulary.token_id({"token": n}), float(lp)) for n, lp in (top or {}).items()]
        infos.append(TokenInfo(vocabulary.token_id({"token": name}), value, _sorted(pairs)))
    return infos


def _sorted(top: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(top, key=lambda pair: -pair[1])


def choice_of(answer: Any) -> dict:
    """The one choice of a (non-streamed or streamed) answer."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ProtocolError(f"expected one choice in the answer: {excerpt(json.dumps(answer))}")
    return choices[0]


def choice_text(choice: dict) -> str:
    for holder in (choice, choice.get("delta") or {}, choice.get("message") or {}):
        for key in ("text", "content"):
            if isinstance(holder.get(key), str):
                return holder[key]
    return ""


def events_from(infos: list[TokenInfo], top: int, texts: list[str]) -> list[TokenEvent]:
    """Events for the tokens; ``texts[i]`` is the text the server sent with token i."""
    return [
        TokenEvent(
            token=info.token,
            logprob=None if info.logprob is None else float(info.logprob),
            top_logprobs=info.top[:top] if top else None,
            text=text,
        )
        for info, text in zip(infos, texts, strict=True)
    ]


# -- the engine ------------------------------------------------------------------------------


@dataclass
class Probe:
    """What the start-up probe found the server to accept and answer."""

    token_prompts: bool = False
    logprob_style: str = "count"
    top_entries: bool = False  # top logprobs come back
    stream: bool = False  # streamed chunks name their tokens
    echo: bool = False  # echo with prompt logprobs: teacher-forced scoring


class OpenAIEngine(Engine):
    name = "openai"
    # The folder holds the tokenizer the token names are mapped back through.
    model_formats = ("hf-folder",)
    url = ""
    option_checks: ClassVar[dict] = {
        "model": non_empty, "api_key_env": set_variable, "chat": flag, "timeout": seconds,
        "token_ids": flag, "top_logprobs": flag,
    }

    @classmethod
    def bind(cls, url: str) -> type[OpenAIEngine]:
        """An ``OpenAIEngine`` class for the server at ``url``."""
        Endpoint.parse(url)  # a bad URL is an error now, before any model is exported
        return type("OpenAIEngine", (cls,), {"url": url})

    def __init__(
        self,
        source: ModelSource,
        *,
        model: str | None = None,
        api_key_env: str | None = None,
        chat: str = "0",
        timeout: str = str(DEFAULT_TIMEOUT_S),
        token_ids: str = "1",
        top_logprobs: str = "1",
    ):
        super().__init__(source)
        from transformers import AutoTokenizer

        self.endpoint = Endpoint.parse(self.url)
        self.served_model = model
        self.use_chat = _flag("chat", chat)
        self.ask_token_ids = _flag("token_ids", token_ids)
        # top_logprobs=0: never ask for top entries (mlx_lm.server 0.32.2 then misnames the
        # chosen token), so the engine does not declare "logprobs".
        self.ask_top = _flag("top_logprobs", top_logprobs)
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env={api_key_env}: that environment variable is empty")
        self.client = HttpClient(self.endpoint, float(timeout), api_key)
        self.tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        config = json.loads((source.path / "config.json").read_text())
        self._vocab_size = int(config["vocab_size"])
        self.vocabulary = Vocabulary(self.tokenizer, self._vocab_size)
        self.chat_frame = chat_frame(self.tokenizer) if self.use_chat else None
        self.probe = self.run_probe()
        caps = {"greedy", "sampling", "logit_bias"}
        caps |= {"logprobs"} if self.probe.top_entries else set()
        caps |= {"stream"} if self.probe.stream else set()
        caps |= {"score"} if self.probe.echo else set()
        self.capabilities = frozenset(caps)

    @property
    def probe_top(self) -> int:
        return PROBE_TOP if self.ask_top else 0

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def describe(self) -> dict:
        found = ", ".join(
            what
            for what, present in (
                ("token-id prompts", self.probe.token_prompts),
                ("streamed token ids", self.probe.stream),
                ("echo scoring", self.probe.echo),
            )
            if present
        )
        return {
            "engine": self.name,
            "version": f"OpenAI-compatible server at {self.endpoint.url} ({found or 'text only'})",
            "model": self.served_model or self.source.name,
        }

    # -- start-up probe ----------------------------------------------------------------------

    def run_probe(self) -> Probe:
        """Ask a two-token question in each way until the server answers one; then see
        whether it streams token ids and scores an echoed prompt."""
        prompt = list(self.tokenizer.encode("Hello", add_special_tokens=False))
        failures = []
        for token_prompts in (True, False):
            for style in LOGPROB_STYLES:
                probe = Probe(token_prompts=token_prompts, logprob_style=style)
                body = self.body(probe, prompt, max_tokens=2, top=self.probe_top)
                try:
                    answer = self.client.post("/completions", body)
                    infos = read_logprobs(choice_of(answer).get("logprobs"), self.vocabulary)
                    self.check_prompt_count(answer, len(prompt))
                except ServerUnreachable:
                    raise
                except (ServerFailure, ServerTimeout, ProtocolError) as error:
                    failures.append(f"{'token ids' if token_prompts else 'text'}, {style}: {error}")
                    continue
                if not infos:
                    raise ServerFailure(
                        "the server returns no logprobs, so the tokens it generates cannot be "
                        f"identified: {excerpt(json.dumps(answer))}"
                    )
                probe.top_entries = self.ask_top and all(len(i.top) >= 1 for i in infos)
                probe.stream = self.probe_stream(probe, prompt)
                probe.echo = self.probe_echo(probe, prompt)
                return probe
        raise ServerFailure(
            "the server answered none of the probe requests: " + " | ".join(failures)
        )

    def probe_stream(self, probe: Probe, prompt: list[int]) -> bool:
        body = self.body(probe, prompt, max_tokens=2, top=self.probe_top) | {"stream": True}
        try:
            chunks = list(self.client.post_stream("/completions", body))
            infos = [
                i
                for c in chunks
                for i in read_logprobs(choice_of(c).get("logprobs"), self.vocabulary)
            ]
        except (ServerFailure, ServerTimeout, ProtocolError):
            return False
        return len(infos) == 2

    def probe_echo(self, probe: Probe, prompt: list[int]) -> bool:
        body = self.body(probe, prompt, max_tokens=1, top=self.probe_top) | {"echo": True}
        try:
            answer = self.client.post("/completions", body)
            infos = read_logprobs(choice_of(answer).get("logprobs"), self.vocabulary)
        except (ServerFailure, ServerTimeout, ProtocolError):
            return False
        scored = infos[1 : len(prompt)]
        return [i.token for i in infos[: len(prompt)]] == prompt and all(
            i.logprob is not None for i in scored
        )

    def check_prompt_count(self, answer: dict, expected: int) -> None:
        """A server that tokenized our text differently would answer another question."""
        counted = (answer.get("usage") or {}).get("prompt_tokens")
        if isinstance(counted, int) and counted != expected:
            raise ProtocolError(
                f"the server counted {counted} prompt tokens; the reference tokenizer has "
                f"{expected} (the server tokenizes the prompt differently)"
            )

    # -- requests ------------------------------------------------------------------------------

    def body(self, probe: Probe, prompt: list[int], max_tokens: int, top: int) -> dict:
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0}
        if self.served_model:
            body["model"] = self.served_model
        body["prompt"] = prompt if probe.token_prompts else self.tokenizer.decode(prompt)
        # Logprobs are always asked for: they name the generated tokens.
        if probe.logprob_style == "count":
            body["logprobs"] = top
        else:
            body |= {"logprobs": True} | ({"top_logprobs": top} if top else {})
        if self.ask_token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    def generation_body(self, request: GenerateRequest) -> tuple[str, dict]:
        """The endpoint and body for ``request``; ``Unsupported`` for what the API lacks."""
        if request.draft is not None:
            raise Unsupported("the OpenAI API has no speculative decoding")
        if request.prompt_embeddings is not None:
            raise Unsupported("the OpenAI API takes no input embeddings")
        if request.cache_key or request.max_kv_size or request.prefill_step_size:
            raise Unsupported("the OpenAI API has no prompt caches, bounded caches or chunking")
        p = request.processors
        if any(
            x not in (None, 0)
            for x in (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        ):
            raise Unsupported(
                "the OpenAI API's penalties have no context window and no repetition penalty"
            )
        body = self.body(self.probe, list(request.prompt), request.max_tokens, request.top_logprobs)
        path = "/completions"
        message = self.chat_message(list(request.prompt))
        if message is not None:
            path = "/chat/completions"
            del body["prompt"]
            body["messages"] = [{"role": "user", "content": message}]
            body |= {"logprobs": True} | (
                {"top_logprobs": request.top_logprobs} if request.top_logprobs else {}
            )
        s = request.sampler
        body["temperature"] = float(s.temp)
        if 0 < s.top_p < 1:
            body["top_p"] = s.top_p
        if s.top_k:
            body["top_k"] = s.top_k
        if s.min_p:
            body["min_p"] = s.min_p
        if s.seed is not None:
            body["seed"] = s.seed
        if p.logit_bias:
            body["logit_bias"] = {str(t): float(b) for t, b in p.logit_bias.items()}
        if request.stop_tokens:
            body["stop_token_ids"] = list(request.stop_tokens)
        texts = [self.tokenizer.decode([t]) for t in request.stop_tokens]
        for sequence in request.stop_sequences:
            text = self.tokenizer.decode(list(sequence))
            if not text or "\ufffd" in text:
                raise Unsupported(f"stop sequence {list(sequence)} is not whole UTF-8 text")
            texts.append(text)
        # A stop token that is not whole UTF-8 cannot be a stop string; stop_token_ids has it.
        if texts := [t for t in texts if t and "\ufffd" not in t]:
            body["stop"] = texts
        return path, body

    def chat_message(self, prompt: list[int]) -> str | None:
        """With ``chat=1``: the user message whose templated form is exactly ``prompt``."""
        if self.chat_frame is None:
            return None
        head, tail = self.chat_frame
        text = self.tokenizer.decode(prompt)
        if not (
            text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)
        ):
            return None
        message = text[len(head) : len(text) - len(tail)]
        if render_chat(self.tokenizer, message) != prompt:
            return None
        return message

    # -- the Engine interface ----------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        path, body = self.generation_body(request)
        top = request.top_logprobs
        if request.stream and self.probe.stream:
            yield from self.streamed(path, body | {"stream": True}, request)
            return
        answer = self.client.post(path, body)
        if not self.probe.token_prompts or path != "/completions":
            self.check_prompt_count(answer, len(request.prompt))
        choice = choice_of(answer)
        infos = read_logprobs(choice.get("logprobs"), self.vocabulary)
        if not infos:
            raise ProtocolError(f"the answer has no logprobs: {excerpt(json.dumps(answer))}")
        # A non-streamed answer carries all its text on the last event.
        events = events_from(infos, top, [""] * (len(infos) - 1) + [choice_text(choice)])
        events[-1].finish_reason = choice.get("finish_reason")
        self.restore_stop_text(request, [e.token for e in events], "", events[-1])
        yield from events

    def streamed(self, path: str, body: dict, request: GenerateRequest) -> Iterator[TokenEvent]:
        """Events as chunks arrive; a chunk's text goes with its last token."""
        top, prompt_length = request.top_logprobs, len(request.prompt)
        pending_text = ""  # text that came before any token of its chunk
        held: TokenEvent | None = None  # the latest event, sent once the next one shows up
        sent_tokens, sent_text = [], ""
        finish = None
        for chunk in self.client.post_stream(path, body):
            if "usage" in chunk and chunk.get("choices") == []:
                if path != "/completions" or not self.probe.token_prompts:
                    self.check_prompt_count(chunk, prompt_length)
                continue
            choice = choice_of(chunk)
            infos = read_logprobs(choice.get("logprobs"), self.vocabulary)
            text = choice_text(choice)
            if infos:
                texts = [""] * (len(infos) - 1) + [pending_text + text]
                pending_text = ""
                for event in events_from(infos, top, texts):
                    if held is not None:
                        sent_tokens.append(held.token)
                        sent_text += held.text
                        yield held
                    held = event
            elif held is not None:
                held.text += text
            else:
                pending_text += text
            finish = choice.get("finish_reason") or finish
            if finish is not None:
                break
        if held is None:
            raise ProtocolError("the event stream carried no tokens")
        if finish is None:
            raise ServerFailure("the event stream ended without a finish_reason")
        held.finish_reason = finish
        self.restore_stop_text(request, [*sent_tokens, held.token], sent_text, held)
        yield held

    def restore_stop_text(
        self, request: GenerateRequest, tokens: list[int], text_before: str, last: TokenEvent
    ) -> None:
        """The OpenAI API leaves a matched stop string out of the text; the protocol keeps
        a completed stop sequence's text (S3). Put it back where the server left exactly
        that string out, and nowhere else (a server that keeps it is left as it is)."""
        if last.finish_reason != "stop":
            return
        for sequence in request.stop_sequences:
            if tokens[-len(sequence):] != list(sequence):
                continue
            stop_text = self.tokenizer.decode(list(sequence))
            if text_before + last.text + stop_text == self.tokenizer.decode(tokens):
                last.text += stop_text
            return

    def score(self, request: ScoreRequest) -> list[TokenEvent]:
        if not self.probe.echo:
            raise Unsupported("the server does not echo prompt logprobs")
        prompt = list(request.prompt) + list(request.continuation)
        body = self.body(self.probe, prompt, max_tokens=1, top=request.top_logprobs) | {
            "echo": True
        }
        answer = self.client.post("/completions", body)
        infos = read_logprobs(choice_of(answer).get("logprobs"), self.vocabulary)
        start = len(request.prompt)
        scored = infos[start : start + len(request.continuation)]
        if [i.token for i in infos[: len(prompt)]] != prompt:
            raise ProtocolError("the echoed tokens are not the prompt that was sent")
        return events_from(scored, request.top_logprobs, [""] * len(scored))

    def generate_batch(self, request: BatchRequest) -> list[list[TokenEvent]]:
        raise Unsupported("the OpenAI API has no batch of its own")


def _flag(name: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def render_chat(tokenizer, message: str) -> list[int]:
    """One user message through the chat template, tokenized as the suite's oracle does."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_frame(tokenizer) -> tuple[str, str] | None:
    """The template's text before and after a user message (None without a template)."""
    marker = "\x00lmconform-message\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # noqa: BLE001 - no template, or one that cannot render: no chat requests
        return None
    head, found, tail = text.partition(marker)
    return (head, tail) if found else None
