"""reference/sampler.py on a batch: batched generation hands one shared sampler the
(rows, vocab) log-probabilities of every row, so each filter must treat each row exactly
as it would alone."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from reference.sampler import apply_min_p, apply_top_k, apply_top_p, greedy_sampler


def rows() -> mx.array:
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, size=(3, 11)).astype(np.float32)
    logits = mx.array(logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_each_filter_treats_each_row_of_a_batch_as_it_would_alone():
    batch = rows()
    filters = [
        lambda x: apply_top_p(x, 0.7),
        lambda x: apply_top_k(x, 3),
        lambda x: apply_min_p(x, 0.2, min_tokens_to_keep=2),
    ]
    for apply in filters:
        together = apply(batch).tolist()
        alone = [apply(batch[i : i + 1]).tolist()[0] for i in range(3)]
        assert together == alone
        assert together != batch.tolist()  # the filter dropped something
    assert greedy_sampler(batch).tolist() == [int(np.argmax(r)) for r in batch.tolist()]
