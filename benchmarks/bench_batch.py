"""Batched decode throughput: the reference's BatchGenerator versus mlx-lm's, same run.

    python -m benchmarks.bench_batch [--batch-sizes 1 4 8 16] [--new-tokens 10] [--rounds 1]

For each batch size, both engines get the same prompts (all prefilled together,
no stop tokens, every sequence runs to ``--new-tokens``). Each decode step yields
one token per sequence; throughput is batch size / median step time, over all
steps of all rounds (prompt processing is left out, and the median shrugs off the
occasional stall of a shared machine). Engines alternate (A B, then B A, ...) so
slow drift of the machine hits both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPTS = [
    "The history of the city begins",
    "In a quiet village by the sea",
    "Water boils at a temperature of",
    "The best way to learn a language",
    "Once upon a time there lived a",
    "The main ingredients of bread are",
    "A list of prime numbers: 2, 3,",
    "The capital of Japan is a city",
]


def load_engines(model_name: str) -> dict:
    """name -> (BatchGenerator class, model, tokenizer) for the reference and mlx-lm."""
    import mlx_lm
    from mlx_lm.generate import BatchGenerator as PeerBatchGenerator

    import reference
    from benchmarks.model_folders import exported_folder

    model, tokenizer = reference.load(model_name)
    peer_model, _ = mlx_lm.load(str(exported_folder(model_name)))
    return {
        "reference": (reference.BatchGenerator, model, tokenizer),
        "mlx-lm": (PeerBatchGenerator, peer_model, tokenizer),
    }


def prompts_for(tokenizer, batch_size: int, length: int) -> list[list[int]]:
    """``batch_size`` distinct prompts of exactly ``length`` tokens."""
    prompts = []
    for i in range(batch_size):
        text = PROMPTS[i % len(PROMPTS)] + f" (example {i})" * 4
        prompts.append(tokenizer.encode(text, add_special_tokens=False)[:length])
    return prompts


def decode_step_times(batch_generator, model, prompts, new_tokens: int) -> list[float]:
    """Seconds between successive decode steps (each yields one token per sequence)."""
    size = len(prompts)
    generator = batch_generator(
        model,
        max_tokens=new_tokens,
        stop_tokens=None,
        prefill_batch_size=size,
        completion_batch_size=size,
    )
    generator.insert(prompts, [new_tokens] * size)
    times, last = [], None
    while responses := generator.next_generated():
        assert len(responses) == size, "every sequence should yield a token at every step"
        now = time.perf_counter()
        if last is not None:  # the first tokens also waited for the prompts
            times.append(now - last)
        last = now
    generator.close()
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first step starts the clock)")

    engines = load_engines(args.model)
    tokenizer = engines["reference"][2]
    for batch_generator, model, _ in engines.values():  # warm-up: first calls compile kernels
        decode_step_times(batch_generator, model, prompts_for(tokenizer, 2, 4), 3)
    load_before = os.getloadavg()[0]

    results = {}
    for size in args.batch_sizes:
        prompts = prompts_for(tokenizer, size, args.prompt_tokens)
        samples = {name: [] for name in engines}
        for round_ in range(args.rounds):
            order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]
            for name in order:
                batch_generator, model, _ = engines[name]
                samples[name] += decode_step_times(batch_generator, model, prompts, args.new_tokens)
        results[size] = {name: size / statistics.median(s) for name, s in samples.items()}
        print(
            f"batch {size:>2}: "
            + ", ".join(f"{n} {v:.2f} tok/s" for n, v in results[size].items()),
            flush=True,
        )

    print(
        f"\n{args.model}: batched decode throughput (tokens/s over all sequences), "
        f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
        f"{args.rounds} round(s); load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print("| batch | reference | mlx-lm | reference / mlx-lm |")
    print("|------:|----------:|-------:|-------------------:|")
    for size, r in results.items():
        print(
            f"| {size} | {r['reference']:.2f} | {r['mlx-lm']:.2f} | "
            f"{r['reference'] / r['mlx-lm']:.2f} |"
        )
    if 1 in results and 8 in results:
        speedup = results[8]["reference"] / results[1]["reference"]
        print(f"\nreference: batch 8 throughput = {speedup:.2f} x batch 1 (goal: >= 3)")


if __name__ == "__main__":
    main()
