"""The reference engine behind an OpenAI-compatible HTTP server (``lmconform serve``).

Like ``mlx_lm.server``: ``/v1/completions`` and ``/v1/chat/completions``, each
non-streaming or streaming (server-sent events), ``/v1/models`` and ``/health``.
It exists so that a client, or the suite's ``openai:`` adapter, can be tested
against a server whose every answer is the reference's, and so that a user can
diff their own server against it with the same client code.

Request fields: ``prompt`` (text or token ids) or ``messages``, ``max_tokens``
(``max_completion_tokens``), ``temperature`` (default 1, as OpenAI), ``top_p``,
``seed``, ``stop``, ``logit_bias``, ``logprobs`` / ``top_logprobs``, ``echo``
(completions: prompt tokens scored, teacher-forced), ``stream``,
``stream_options.include_usage``, ``presence_penalty`` / ``frequency_penalty``
(mlx-lm semantics: over the last 20 tokens of prompt and output). Common extensions:
``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids`` and
``return_tokens_as_token_ids`` (as in vLLM: tokens named ``token_id:N``).

Where it deliberately differs from OpenAI, it follows the lmconform protocol:
stop strings are matched on tokens (a string is tokenized; generation stops once
the output ends with those tokens) and their text stays in the output; a final
end-of-sequence or ``stop_token_ids`` token is reported in the logprobs but adds
no text. Token names in logprobs are the token's text, or ``bytes:\\xNN...`` for
a token that is not whole UTF-8 (as vLLM does).

All MLX work runs on one worker thread, one request at a time: the reference
is a correctness tool, not a throughput one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from reference.dummy import bytes_to_unicode
from reference.generate import generate_step
from reference.logits_processors import make_logits_processors
from reference.prefill import log_softmax
from reference.sampler import make_sampler

MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}  # OpenAI's completions default is 16
BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


class RequestError(Exception):
    """A request the server cannot serve: answered with HTTP 400 and this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Params:
    """One generation request, validated and in the reference's terms."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_sequences: list[list[int]] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    penalties: dict[str, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; else the number of top entries per token
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    token_ids: bool = False  # name tokens "token_id:N"


@dataclass
class Step:
    """One token of an answer: generated, or (with ``echo``) a scored prompt token."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]
    text: str
    finish_reason: str | None = None


# -- parsing requests ------------------------------------------------------------------------


def parse_request(body: Any, tokenizer, vocab_size: int, chat: bool) -> Params:
    """The request ``body`` (decoded JSON) as ``Params``; ``RequestError`` if it is not valid."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    prompt = chat_prompt(body, tokenizer) if chat else completion_prompt(body, tokenizer)
    if not prompt:
        raise RequestError("the prompt is empty", "prompt")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    echo = _typed(body, "echo", bool, False) if not chat else False
    default = DEFAULT_MAX_TOKENS["chat" if chat else "completions"]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise RequestError("max_tokens must be a non-negative integer", "max_tokens")
    if max_tokens == 0 and not echo:
        raise RequestError("max_tokens=0 needs echo=true (scoring the prompt)", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("stop must be a string or a list of non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    return Params(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0),
        top_k=int(_number(body, "top_k", 0, low=0)),
        min_p=_number(body, "min_p", 0.0, low=0.0, high=1.0),
        seed=_typed(body, "seed", int, None),
        stop_sequences=[list(tokenizer.encode(s, add_special_tokens=False)) for s in stop],
        stop_token_ids=_token_ids(body.get("stop_token_ids") or [], vocab_size),
        logit_bias=_logit_bias(body.get("logit_bias") or {}, vocab_size),
        penalties={
            name: _number(body, name, 0.0, low=-2.0 if name != "repetition_penalty" else 0.0)
            for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
            if body.get(name)
        },
        logprobs=_logprobs(body, chat),
        echo=echo,
        stream=_typed(body, "stream", bool, False),
        include_usage=bool(
            isinstance(stream_options, dict) and stream_options.get("include_usage")
        ),
        token_ids=_typed(body, "return_tokens_as_token_ids", bool, False),
    )


def completion_prompt(body: dict, tokenizer) -> list[int]:
    """``prompt``: text (tokenized, with BOS unless the text starts with it) or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        return list(
            tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        )
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return list(prompt)
    raise RequestError("prompt must be a string or a list of token ids (one prompt)", "prompt")


def chat_prompt(body: dict, tokenizer) -> list[int]:
    """``messages`` through the model's chat template, as the suite's oracle encodes chats."""
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise RequestError("messages must be a non-empty list of objects", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # noqa: BLE001 - a template error is the request's fault
        raise RequestError(f"the chat template failed on these messages: {error}", "messages")
    return list(tokenizer.encode(text, add_special_tokens=False))


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{name} must be of type {kind.__name__}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(f"{name} must be a number", name)
    if value < low or (high is not None and value > high):
        raise RequestError(
            f"{name} must be in [{low}, {high if high is not None else 'inf'}]", name
        )
    return float(value)


def _token_ids(ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(ids, list) or any(
        not isinstance(t, int) or not 0 <= t < vocab_size for t in ids
    ):
        raise RequestError(
            f"stop_token_ids must be token ids in [0, {vocab_size})", "stop_token_ids"
        )
    return list(ids)


def _logit_bias(bias: Any, vocab_size: int) -> dict[int, float]:
    """OpenAI's ``logit_bias``: token id (a JSON key, so a string) -> bias in [-100, 100]."""
    if not isinstance(bias, dict):
        raise RequestError("logit_bias must be an object of token id -> bias", "logit_bias")
    parsed = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size or not isinstance(value, (int, float)):
            raise RequestError(f"logit_bias entry {key!r}: {value!r} is not valid", "logit_bias")
        parsed[token] = float(min(100.0, max(-100.0, value)))
    return parsed


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: ``logprobs: true`` and ``top_logprobs: N``. Completions: ``logprobs: N``
    (``logprobs: true`` with ``top_logprobs`` is accepted too, as mlx_lm.server takes it)."""
    logprobs = body.get("logprobs")
    if logprobs is None or logprobs is False:
        return None
    if logprobs is True:
        top = body.get("top_logprobs") or 0
    elif not chat and isinstance(logprobs, int):
        top = logprobs
    else:
        raise RequestError(
            "logprobs must be " + ("a boolean" if chat else "an integer"), "logprobs"
        )
    if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(
            f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs"
        )
    return top


# -- generating ------------------------------------------------------------------------------


def generate_steps(model, tokenizer, params: Params, cancelled=lambda: False) -> Iterator[Step]:
    """The answer's tokens: the scored prompt first (with ``echo``), then the generated ones.

    Generated text pieces come from the reference's streaming detokenizer; a final end
    or stop token adds no text. ``cancelled()`` is asked between tokens (a client gone).
    """
    if params.echo:
        yield from echo_steps(model, tokenizer, params)
    if params.max_tokens == 0:
        return
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(
        temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
    )
    processors = make_logits_processors(logit_bias=params.logit_bias, **params.penalties)
    ends = set(tokenizer.eos_token_ids) | set(params.stop_token_ids)
    detokenizer = tokenizer.detokenizer
    tokens: list[int] = []
    steps = generate_step(
        mx.array(params.prompt, dtype=mx.int32),
        model,
        max_tokens=params.max_tokens,
        sampler=sampler,
        logits_processors=processors or None,
    )
    for token, logprobs in steps:
        tokens.append(int(token))
        finish = None
        if token in ends or any(s and tokens[-len(s) :] == s for s in params.stop_sequences):
            finish = "stop"
        elif len(tokens) == params.max_tokens:
            finish = "length"
        if token not in ends:
            detokenizer.add_token(token)
        if finish is not None:
            detokenizer.finalize()
        chosen, top = token_logprobs(logprobs, token, params.logprobs)
        yield Step(int(token), chosen, top, detokenizer.last_segment, finish)
        if finish is not None or cancelled():
            return


def echo_steps(model, tokenizer, params: Params) -> Iterator[Step]:
    """The prompt's tokens, each with its teacher-forced logprob (the first has none)."""
    prompt = params.prompt
    logits = model(mx.array(prompt, dtype=mx.int32)[None])[0].astype(mx.float32)
    logprobs = log_softmax(logits)  # (positions, vocab): position i predicts token i + 1
    previous = ""
    for i, token in enumerate(prompt):
        text = tokenizer.decode(prompt[: i + 1])
        piece, previous = text[len(previous) :], text
        if i == 0:
            yield Step(token, None, [], piece)
        else:
            chosen, top = token_logprobs(logprobs[i - 1], token, params.logprobs)
            yield Step(token, chosen, top, piece)


def token_logprobs(
    logprobs: mx.array, token: int, top: int | None
) -> tuple[float | None, list[tuple[int, float]]]:
    """The chosen token's logprob and the ``top`` most likely (id, logprob), most likely first."""
    if top is None:
        return None, []
    vector = np.array(logprobs.astype(mx.float32)).reshape(-1)
    best = []
    if top > 0:
        ids = np.argpartition(-vector, top - 1)[:top]
        ids = ids[np.argsort(-vector[ids], kind="stable")]
        best = [(int(t), float(vector[t])) for t in ids]
    return float(vector[token]), best


# -- writing answers ---------------------------------------------------------------------------


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for: byte-level BPE pieces map back character by character."""
    piece = tokenizer.convert_ids_to_tokens(int(token))
    special = token in tokenizer.all_special_ids
    if piece is not None and not special and all(char in BYTE_OF_CHAR for char in piece):
        return bytes(BYTE_OF_CHAR[char] for char in piece)
    return tokenizer.decode([int(token)]).encode()


def token_name(tokenizer, token: int, as_id: bool) -> str:
    """How logprobs name a token: ``token_id:N``, its text, or ``bytes:\\xNN...``."""
    if as_id:
        return f"token_id:{token}"
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(steps: list[Step], tokenizer, params: Params, offset: int = 0) -> dict:
    """The completions API's logprobs: parallel lists, top entries as name -> logprob."""
    names = [token_name(tokenizer, s.token, params.token_ids) for s in steps]
    offsets, position = [], offset
    for step in steps:
        offsets.append(position)
        position += len(step.text)
    return {
        "tokens": names,
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [
            {token_name(tokenizer, t, params.token_ids): lp for t, lp in s.top}
            if s.logprob is not None
            else None
            for s in steps
        ],
        "text_offset": offsets,
    }


def chat_logprobs(steps: list[Step], tokenizer, params: Params) -> dict:
    """The chat API's logprobs: one entry per token, with its bytes and top entries."""

    def entry(token: int, logprob: float) -> dict:
        return {
            "token": token_name(tokenizer, token, params.token_ids),
            "logprob": logprob,
            "bytes": list(token_bytes(tokenizer, token)),
        }

    return {
        "content": [
            entry(s.token, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top]}
            for s in steps
        ]
    }


@dataclass
class Answer:
    """What one response (or one streamed chunk) says."""

    steps: list[Step]
    finish_reason: str | None


def choice(answer: Answer, tokenizer, params: Params, chat: bool, delta: bool) -> dict:
    text = "".join(s.text for s in answer.steps)
    body: dict[str, Any] = {"index": 0, "finish_reason": answer.finish_reason, "logprobs": None}
    if params.logprobs is not None and answer.steps:
        body["logprobs"] = (
            chat_logprobs(answer.steps, tokenizer, params)
            if chat
            else completion_logprobs(answer.steps, tokenizer, params)
        )
    if not chat:
        body["text"] = text
    elif delta:
        body["delta"] = {"content": text} if text or answer.finish_reason is None else {}
    else:
        body["message"] = {"role": "assistant", "content": text}
    return body


def usage(params: Params, generated: int) -> dict:
    prompt = len(params.prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


# -- the application ---------------------------------------------------------------------------


class ReferenceServer:
    """The model, its tokenizer and the one thread that runs MLX."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self.model, self.tokenizer = self.executor.submit(self._load).result()
        self.vocab_size = int(
            self.executor.submit(lambda: self.model(mx.array([[0]])).shape[-1]).result()
        )

    def _load(self):
        import reference

        return reference.load(self.model_name)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "owned_by": "lmconform"}],
            }
        )

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def completions(self, request: Request):
        return await self.serve(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.serve(request, chat=True)

    async def serve(self, request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
            params = parse_request(body, self.tokenizer, self.vocab_size, chat)
        except json.JSONDecodeError as error:
            return error_response(f"the request body is not JSON: {error}", None)
        except RequestError as error:
            return error_response(str(error), error.param)
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.get("model") or self.model_name,
        }
        if params.stream:
            return StreamingResponse(
                self.events(params, chat, meta), media_type="text/event-stream"
            )
        loop = asyncio.get_running_loop()
        steps = await loop.run_in_executor(
            self.executor, lambda: list(generate_steps(self.model, self.tokenizer, params))
        )
        finish = steps[-1].finish_reason if steps else "length"
        generated = len(steps) - (len(params.prompt) if params.echo else 0)
        return JSONResponse(
            meta
            | {
                "object": "chat.completion" if chat else "text_completion",
                "choices": [
                    choice(Answer(steps, finish), self.tokenizer, params, chat, delta=False)
                ],
                "usage": usage(params, generated),
            }
        )

    async def events(self, params: Params, chat: bool, meta: dict):
        """Server-sent events: one chunk per token, then usage if asked, then ``[DONE]``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()
        done = object()

        def produce() -> None:
            try:
                steps = generate_steps(self.model, self.tokenizer, params, gone.is_set)
                for step in steps:
                    loop.call_soon_threadsafe(queue.put_nowait, step)
            except Exception as error:  # noqa: BLE001 - reported to the client in the stream
                loop.call_soon_threadsafe(queue.put_nowait, error)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        obj = "chat.completion.chunk" if chat else "text_completion"
        work = loop.run_in_executor(self.executor, produce)
        generated = 0
        try:
            if chat:
                first = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                }
                yield sse(meta | {"object": obj, "choices": [first]})
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    yield sse({"error": {"message": str(item), "type": "server_error"}})
                    break
                generated += 1
                answer = Answer([item], item.finish_reason)
                yield sse(
                    meta
                    | {
                        "object": obj,
                        "choices": [choice(answer, self.tokenizer, params, chat, True)],
                    }
                )
            if params.include_usage:
                count = generated - (len(params.prompt) if params.echo else 0)
                yield sse(meta | {"object": obj, "choices": [], "usage": usage(params, count)})
            yield b"data: [DONE]\n\n"
        finally:
            gone.set()
            await work


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def error_response(message: str, param: str | None, status: int = 400) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
        status_code=status,
    )


def serve(model: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Load ``model`` and serve it until stopped; ``port=0`` picks a free port.

    The line ``serving MODEL at http://HOST:PORT/v1`` goes to stderr once the model
    is loaded and the socket listens (tests wait for it)."""
    import socket

    import uvicorn

    server = ReferenceServer(model)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model} at http://{shown}:{bound}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
