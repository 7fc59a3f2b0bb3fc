"""``lmconform models``: list the built-in models, export one as a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
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
