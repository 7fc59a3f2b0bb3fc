"""The reference's commands: ``lmconform generate`` and ``lmconform models``."""

from __future__ import annotations

import argparse
import sys


def add_parsers(subparsers) -> None:
    add_generate_parser(subparsers)
    add_models_parser(subparsers)



def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with the reference engine and report speed",
        description="Generate with the reference engine; prints the text, then prompt and "
        "generation speed, peak memory and finish reason.",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="built-in name, folder, .gguf or Hub id"
    )
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="raw prompt text")
    prompt.add_argument("--chat", help="user message, wrapped in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draft-model", help="draft model for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=int, default=2)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from reference import load, make_sampler, stream_generate

    if args.max_tokens <= 0:
        print(f"error: --max-tokens must be positive, got {args.max_tokens}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load(args.model)
        draft = load(args.draft_model)[0] if args.draft_model else None
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
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
    extra = {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens} if draft else {}
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
    export.add_argument("name", help="built-in name, .gguf file, model folder or Hub id")
    export.add_argument("directory", help="output folder (created if missing)")
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
