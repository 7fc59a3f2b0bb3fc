"""reference/logits_processors.py: the repetition penalty's range, at its boundary, and its
refusal word for word."""

from __future__ import annotations

import mlx.core as mx
import pytest

from reference.logits_processors import make_repetition_penalty


def test_a_repetition_penalty_of_zero_is_allowed_and_below_zero_refused():
    # Zero is non-negative: it zeroes the negative logits of seen tokens (and sends
    # positive ones to infinity, which is what "divide by the penalty" says).
    processor = make_repetition_penalty(0)
    logits = mx.array([[-2.0, 3.0, -1.0]])
    out = processor(mx.array([0, 1]), logits).tolist()[0]
    assert out[0] == 0.0 and out[1] == float("inf") and out[2] == -1.0
    for bad in (-0.5, "2"):
        with pytest.raises(ValueError) as raised:
            make_repetition_penalty(bad)
        assert str(raised.value) == f"repetition_penalty must be a non-negative number, got {bad}"
