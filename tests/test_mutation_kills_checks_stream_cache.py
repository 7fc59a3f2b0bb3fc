"""conformance/checks/stream.py, prompt_cache.py and sampled.py pinned down further: what
each request sent to the engine is (streamed or not, cached or not), the label each engine
call carries into a protocol violation, what the reference is asked, and the steps, tokens
and accounts of a sampled path's problems at the near-tie boundary.

Engines are the unbroken reference wrapper on ``dummy`` (``Control``) and small subclasses
with one deliberate difference (one call answers a token outside the vocabulary, or every
request is recorded); the sampled path is judged on hand-made log-probabilities."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conformance_helpers import dummy_case, dummy_oracle, make_trace
from conformance_helpers import run_dummy_case as run
from mutants import Control

from conformance.checks.sampled import SampledStep, judge_sampled_path
from conformance.comparator import PASS
from conformance.profiles import PROFILES
from engines.models import ModelSource
from engines.protocol import SamplerSettings

SOURCE = ModelSource("dummy", "builtin")
OUTSIDE = 100_000  # a token outside the dummy's vocabulary


class Recording(Control):
    """The reference wrapper; every request it is sent is kept, in order."""

    name = "recording"

    def __init__(self):
        super().__init__(SOURCE)
        self.sent = []

    def generate(self, request):
        self.sent.append(request)
        return super().generate(request)


class BrokenOnCall(Control):
    """Answers its ``call``-th request (1-based) with a token outside the vocabulary at
    step 1; every other request is answered correctly."""

    name = "broken"

    def __init__(self, call):
        super().__init__(SOURCE)
        self.call, self.calls = call, 0

    def generate(self, request):
        self.calls += 1
        for i, event in enumerate(super().generate(request)):
            yield replace(event, token=OUTSIDE) if i == 1 and self.calls == self.call else event


def violation(label: str) -> str:
    vocab = dummy_oracle().vocab_size
    return (
        f"protocol violation: broken ({label}): token {OUTSIDE} at step 1 is outside the "
        f"vocabulary [0, {vocab})"
    )


# -- stream ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("written", [True, False])
def test_stream_sends_the_streamed_request_first_and_the_whole_one_second(written):
    # Whatever the case's request says of streaming (a catalogue request may say
    # stream = false), the check asks for one streamed and one whole answer.
    case = dummy_case("stream/equals_nonstream")
    case = replace(case, request={**case.request, "stream": written})
    engine = Recording()
    assert run(case, engine).verdict == PASS
    streamed, whole = engine.sent
    # Exactly True and False (not a missing or None flag).
    assert (streamed.stream, whole.stream) == (True, False)
    assert streamed.stream is True and whole.stream is False
    assert replace(streamed, stream=False) == whole


@pytest.mark.parametrize("call, label", [(1, "streaming"), (2, "non-streaming")])
def test_each_answer_of_the_stream_check_is_labelled_in_a_protocol_violation(call, label):
    result = run("stream/equals_nonstream", BrokenOnCall(call))
    assert (result.verdict, result.reason) == ("fail", violation(label))


# -- prompt cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, label",
    [(1, "first turn"), (2, "second turn, cached"), (3, "second turn, from scratch")],
)
def test_each_turn_of_the_prompt_cache_check_is_labelled_in_a_protocol_violation(call, label):
    result = run("prompt_cache/continuation", BrokenOnCall(call))
    assert (result.verdict, result.reason) == ("fail", violation(label))


class AskedOracle:
    """The shared dummy oracle, keeping every request it is asked to answer."""

    def __init__(self, oracle):
        self._oracle = oracle
        self.asked = []

    def answer(self, request, *top):
        self.asked.append(request)
        return self._oracle.answer(request, *top)

    def __getattr__(self, name):
        return getattr(self._oracle, name)


def test_the_reference_answers_the_second_turn_from_scratch_without_the_cache_key():
    # A reference answer is a question of its own (snapshots find it by the request's key),
    # never one under the engine's cache key: the reference is asked with cache_key None.
    engine, oracle = Recording(), AskedOracle(dummy_oracle())
    assert run("prompt_cache/continuation", engine, oracle).verdict == PASS
    _, cached, fresh = engine.sent
    assert cached.cache_key == "lmconform:prompt_cache/continuation"
    second_turns = [r for r in oracle.asked if list(r.prompt) == list(cached.prompt)]
    assert second_turns, "the reference was not asked the second turn"
    assert [r.cache_key for r in oracle.asked] == [None] * len(oracle.asked)
    assert replace(second_turns[0], stream=fresh.stream, top_logprobs=fresh.top_logprobs) == fresh


# -- sampled paths --------------------------------------------------------------------------------

PROFILE = PROFILES["fp32"]
EPS = PROFILE.tie_epsilon
# Two tokens kept by top_k=2 (the weakest at -1.0); token 2 sits exactly the near-tie
# epsilon below the weakest, token 3 far below it.
LOGPROBS = np.array([-0.25, -1.0, -1.0 - EPS, -5.0])
TOP2 = SamplerSettings(temp=1.0, top_k=2, seed=1)


def judge(tokens, logprobs=None):
    trace = make_trace(tokens, logprobs)
    return judge_sampled_path(trace, TOP2, lambda prefix: LOGPROBS, PROFILE, lambda t: f"t{t}")


def test_the_weakest_kept_token_is_allowed():
    assert float(LOGPROBS[1]) == -1.0
    assert judge([1, 0, 1]) == []


def test_a_token_exactly_the_near_tie_epsilon_below_the_weakest_is_allowed():
    # expected == weakest - epsilon: on the allowed side (only "<" excludes).
    assert float(LOGPROBS[2]) == float(LOGPROBS[1]) - EPS
    assert judge([2]) == []
    assert judge([0, 2, 2]) == []


def test_an_excluded_token_is_reported_with_its_step_and_token():
    problems = judge([0, 1, 3])
    assert problems == [
        SampledStep(
            2,
            3,
            "step 2: 't3'(3) (logprob -5) is not among the 2 tokens the settings allow "
            "(the weakest -1)",
        )
    ]


def test_a_wrong_logprob_is_reported_with_its_step_and_token():
    problems = judge([0, 1, 1], logprobs=[-0.25, -1.0, -1.5])
    assert problems == [
        SampledStep(2, 1, "step 2: logprob of 't1'(1) -1.5, the reference's -1 (tolerance 0.0021)")
    ]
    [problem] = problems
    assert (problem.step, problem.token) == (2, 1)
