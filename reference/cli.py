"""The reference's commands: ``lmconform generate``, ``models`` and ``serve``."""

from __future__ import annotations

import argparse
import math
import sys


def add_parsers(subparsers) -> None:
    add_generate_parser(subparsers)
    add_models_parser(subparsers)
    add_serve_parser(subparsers)



def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with the reference engine and report speed",
        description="Generate with the reference engine; prints the text, then prompt and "
        "generation speed, peak memory and finish reason.",
    )
    parser.add_argument(
        "--model",
        type=given,
        default="smollm2-135m",
        help="built-in name, folder, .gguf or Hub id",
    )
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="raw prompt text")
    prompt.add_argument("--chat", help="user message, wrapped in the model's chat template")
    parser.add_argument("--max-tokens", type=bounded(int, 1, MAX_TOKENS), default=64)
    parser.add_argument("--temp", type=bounded(float, 0.0, MAX_TEMP), default=0.0)
    parser.add_argument("--top-p", type=bounded(float, 0.0, 1.0), default=0.0)
    parser.add_argument("--top-k", type=bounded(int, 0, MAX_TOKEN_ID), default=0)
    parser.add_argument("--min-p", type=bounded(float, 0.0, 1.0), default=0.0)
    parser.add_argument("--seed", type=bounded(int, 0, 2**64 - 1), default=0)
    parser.add_argument("--draft-model", type=given, help="draft model for speculative decoding")
    parser.add_argument(
        "--num-draft-tokens",
        type=bounded(int, 1, 64),
        default=None,
        help="tokens drafted per step (default 2; needs --draft-model)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="keep quantized weights quantized (the exact path); default: the fast path, "
        "weights de-quantized to float32 at load",
    )
    parser.set_defaults(func=run)


MAX_TOKENS = 1_000_000  # more is a typo (at 6 tokens/s: two days)
MAX_TEMP = 1000.0  # beyond this every distribution is uniform to float precision
MAX_TOKEN_ID = 2**31 - 1


def bounded(kind: type, low, high):
    """An argparse type: a finite ``kind`` in [low, high]; anything else is a usage error
    (exit status 2) naming the value and the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text!r} is not in [{low:g}, {high:g}]")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def given(text: str) -> str:
    """An argparse type: a name or path that is not empty (``''`` would mean the current
    folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


def contradictions(args: argparse.Namespace) -> str | None:
    """Options that would be ignored silently: sampling filters at temperature 0 (greedy),
    draft tokens without a draft model."""
    filters = [f"--{name}" for name, value in
               (("top-p", args.top_p), ("top-k", args.top_k), ("min-p", args.min_p)) if value]
    if filters and args.temp == 0:
        return f"{', '.join(filters)}: need --temp above 0 (at temperature 0 decoding is greedy)"
    if args.num_draft_tokens is not None and args.draft_model is None:
        return "--num-draft-tokens: needs --draft-model"
    return None


def run(args: argparse.Namespace) -> int:
    problem = contradictions(args)
    if problem:
        print(f"lmconform generate: error: {problem}", file=sys.stderr)
        return 2
    # reference before mlx.core: importing it puts OpenBLAS under MLX (reference/blas.py).
    from reference import load, make_sampler, stream_generate  # noqa: I001
    from reference.inputs import check_sampler
    import mlx.core as mx

    try:
        model, tokenizer = load(args.model, fast=not args.exact)
        draft = load(args.draft_model, fast=not args.exact)[0] if args.draft_model else None
    except (OSError, ValueError) as error:
        print(f"lmconform generate: error: {error}", file=sys.stderr)
        return 2
    if args.prompt is None:
        message = args.chat or "What is the capital of France?"
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True
        )
    else:
        prompt = tokenizer.encode(args.prompt)
    mx.random.seed(args.seed)
    sampler = make_sampler(args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k)
    try:
        check_sampler(sampler, model)
    except ValueError as error:  # settings that do not fit this model (top-k >= vocabulary)
        print(f"lmconform generate: error: --top-k: {error}", file=sys.stderr)
        return 2
    drafted = args.num_draft_tokens or 2
    extra = {"draft_model": draft, "num_draft_tokens": drafted} if draft else {}
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler, **extra
    ):
        print(response.text, end="", flush=True)
    print()
    print(
        f"prompt: {response.prompt_tokens} tokens at {response.prompt_tps:.2f} tokens/s | "
        f"generation: {response.generation_tokens} tokens at {response.generation_tps:.2f} "
        f"tokens/s | peak memory {response.peak_memory:.3f} GB | "
        f"finish: {response.finish_reason}",
        file=sys.stderr,
    )
    return 0



def add_models_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the built-in models or export one as a Hugging Face folder",
        description="Built-in models of the reference engine.",
    )
    commands = parser.add_subparsers(dest="models_command", required=True)

    listing = commands.add_parser("list", help="list the built-in model names")
    listing.set_defaults(func=run_list)

    export = commands.add_parser(
        "export",
        help="write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer)",
        description="Write a model as a Hugging Face folder that transformers (float models) "
        "and mlx-lm (float and quantized models) load.",
    )
    export.add_argument(
        "name", type=given, help="built-in name, .gguf file, model folder or Hub id"
    )
    export.add_argument("directory", type=given, help="output folder (created if missing)")
    export.set_defaults(func=run_export)


def run_list(args: argparse.Namespace) -> int:
    from reference.loading import BUILTIN_MODELS

    width = max(len(name) for name in BUILTIN_MODELS)
    for name, model in BUILTIN_MODELS.items():
        print(f"{name:<{width}}  {model.description}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from reference.export import export_model

    try:
        out = export_model(args.name, args.directory)
    except (OSError, ValueError) as error:
        print(f"lmconform models export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.name} to {out}")
    return 0


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the reference engine over an OpenAI-compatible HTTP API",
        description="The reference engine behind /v1/completions and /v1/chat/completions "
        "(streaming, logprobs, token-id prompts, stop, logit_bias, seed); see reference/server.py.",
    )
    parser.add_argument(
        "--model",
        type=given,
        default="smollm2-135m",
        help="built-in name, folder, .gguf or Hub id",
    )
    parser.add_argument(
        "--host", type=given, default="127.0.0.1", help="address to bind (default: loopback)"
    )
    parser.add_argument(
        "--port", type=bounded(int, 0, 65535), default=8080, help="port (0: any free port)"
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from reference.server import serve

    try:
        serve(args.model, args.host, args.port)
    except ValueError as error:  # the model cannot be loaded (unknown name, bad folder)
        print(f"lmconform serve: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the port is taken, the address is not ours
        print(f"lmconform serve: error: --host {args.host} --port {args.port}: {error}",
              file=sys.stderr)
        return 2
    return 0
