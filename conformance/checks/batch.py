"""Kind ``batch``: every row of a batch equals that request generated alone.

Rows come from ``params.rows`` (each a request, with an optional
``insert_at``: generation steps of the batch before the row joins, and an
optional ``cache_prefix``: the row reuses a prompt cache that a single request
for the prompt's first ``cache_prefix`` tokens warmed beforehand; it is then
judged against its run from scratch), or, with
``params.haystack``, the case's request is a needle placed at a seeded random
position among random prompts of random lengths, and only its row is judged.

A sampled row is not compared with its run alone: like mlx-lm's, a batch may draw every
row from one random generator, seeded once (PROTOCOL.md S4). The whole batch is run again
instead, and each sampled row must repeat its tokens (same seeds, same batch, same tokens);
against the reference, its tokens are judged on its own path (``sampled.py``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from conformance.catalogue import random_prompts
from conformance.checks.context import CaseContext
from engines.protocol import BatchRequest, BatchRow, GenerateRequest


def run(ctx: CaseContext) -> None:
    rows, judged = _rows(ctx)
    batch = BatchRequest(rows)
    ctx.require(batch.capabilities_needed())
    ctx.primary_reference(replace(ctx.request(), cache_key=None))
    _warm_caches(ctx, rows)
    traces = ctx.run_batch(batch)
    sampled = any(not row.request.sampler.greedy for row in rows)
    again = ctx.run_batch(batch) if sampled else None
    name = ctx.engine_name
    for i in judged:
        request = replace(rows[i].request, cache_key=None)  # alone and reference: from scratch
        if again is not None and not request.sampler.greedy:
            ctx.compare(
                f"row {i}, the batch again",
                traces[i],
                again[i],
                f"{name} batch row {i}",
                f"{name} batch again, row {i}",
            )
        else:
            alone = ctx.run(request, f"row {i} alone")
            ctx.compare(
                f"row {i} in batch vs alone",
                alone,
                traces[i],
                f"{name} alone",
                f"{name} batch row {i}",
            )
        ctx.compare(
            f"row {i} in batch vs reference",
            ctx.reference(request),
            traces[i],
            "reference",
            f"{name} batch row {i}",
        )


def _warm_caches(ctx: CaseContext, rows: list[BatchRow]) -> None:
    """Fill each cached row's cache with a single request for the first part of its prompt."""
    for i, (row, spec) in enumerate(zip(rows, ctx.params.get("rows", []))):
        if row.request.cache_key is None:
            continue
        prefix = list(row.request.prompt[: spec["cache_prefix"]])
        warm = GenerateRequest(prompt=prefix, max_tokens=1, cache_key=row.request.cache_key)
        ctx.run(warm, f"row {i} cache warm-up")


def _rows(ctx: CaseContext) -> tuple[list[BatchRow], list[int]]:
    if "rows" in ctx.params:
        rows = []
        for i, spec in enumerate(ctx.params["rows"]):
            spec = dict(spec)
            insert_at = int(spec.pop("insert_at", 0))
            cached = spec.pop("cache_prefix", None) is not None
            request = ctx.request(spec)
            if cached:
                request = replace(request, cache_key=f"lmconform:{ctx.case.id}:row{i}")
            rows.append(BatchRow(request, insert_at))
        return rows, list(range(len(rows)))
    hay = ctx.params["haystack"]
    rng = np.random.default_rng(hay["seed"])
    prompts = random_prompts(
        ctx.oracle, hay["count"], hay["seed"], hay["min_chars"], hay["max_chars"]
    )
    rows = [
        BatchRow(ctx.request({"prompt_tokens": p, "max_tokens": int(rng.integers(4, 21))}))
        for p in prompts
    ]
    position = int(rng.integers(0, len(rows) + 1))
    rows.insert(position, BatchRow(ctx.request()))
    return rows, [position]
