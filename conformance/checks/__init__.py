"""What each kind of case runs and asserts; ``CHECKS`` maps a kind to its function.

- equivalence.py   engine answer == reference answer, per request variant
- stream.py        streaming == non-streaming
- invariance.py    speculative, chunked-prefill, embeddings input == plain
- batch.py         batch rows == single runs (incl. needle, staggered insertion)
- prompt_cache.py  cached continuation == computation from scratch
- sampling.py      seeds repeat; draws fit the implied distribution
- scoring.py       teacher-forced logprobs == reference's
- agreement.py     teacher-forced distributions over a shipped text within the profile's limits
- validation.py    invalid requests refused as bad requests (S6)
- sampled.py       a seeded sampled answer judged on its own path (used by context.py)
- context.py       what every check works with (running, validating, comparing)
"""

from __future__ import annotations

from conformance.checks import (
    agreement,
    batch,
    equivalence,
    invariance,
    prompt_cache,
    sampling,
    scoring,
    stream,
    validation,
)

CHECKS = {
    "equivalence": equivalence.run,
    "stream": stream.run,
    "invariance": invariance.run,
    "batch": batch.run,
    "prompt_cache": prompt_cache.run,
    "seed": sampling.run_seed,
    "distribution": sampling.run_distribution,
    "score": scoring.run,
    "agreement": agreement.run,
    "request_validation": validation.run,
}
