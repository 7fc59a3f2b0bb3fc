"""conformance/snapshots/compare.py pinned down: each difference between a stored and a new
snapshot of the dummy model's greedy group, reported word for word (the report is what a
maintainer reads to see what changed), and the float tolerances at their bounds."""

from __future__ import annotations

from dataclasses import replace

from conformance.comparator import compare_traces
from conformance.profiles import get_profile
from conformance.snapshots.compare import (
    EMBEDDING_ATOL,
    Difference,
    GroupComparison,
    compare_groups,
)
from conformance.snapshots.oracle import SnapshotVocabulary
from conformance.snapshots.store import (
    GOLDEN_DIR,
    Embedding,
    group_from_json,
    group_to_json,
    read_group,
    read_vocabulary,
)

HELLO = "greedy/hello"
PROMPT = "prompt=[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]"
WHERE = f"answer 0 (generate {PROMPT}, max_tokens=24)"


def stored():
    return read_group(GOLDEN_DIR, "dummy", "greedy")


def copy(group):
    return group_from_json(group_to_json(group))


def decode(tokens):
    return SnapshotVocabulary(read_vocabulary(GOLDEN_DIR, "dummy")).decode(tokens)


def lines(old, new) -> list[str]:
    return [d.render() for d in compare_groups(old, new, decode).differences]


def test_an_identical_snapshot_matches_with_nothing_to_say():
    comparison = compare_groups(stored(), stored(), decode)
    assert comparison.matches and comparison.render() == ""
    assert comparison.near_ties == []


def test_group_fields_and_cases_that_came_or_went():
    old = stored()
    new = copy(old)
    new.model, new.engine = "other", "mlx-lm"
    del new.cases[HELLO]
    new.cases["greedy/zz"] = new.cases["greedy/fox"]
    assert lines(old, new) == [
        "(group): model 'dummy' -> 'other'",
        "(group): engine 'reference' -> 'mlx-lm'",
        f"{HELLO}: in the snapshot, but no longer recorded",
        "greedy/zz: new case, not in the snapshot",
    ]
    new = copy(old)
    new.group, new.profile = "g2", "q4"
    assert lines(old, new) == ["(group): group 'greedy' -> 'g2'", "(group): profile 'fp32' -> 'q4'"]


def test_what_a_case_was_asked_and_answered_before_its_tokens():
    old = stored()
    new = copy(old)
    case = new.cases[HELLO]
    case.definition, case.not_replayable, case.verdict = "abc", "no", "fail"
    case.inputs.encode["Hello, world!"] = [1]
    case.inputs.encode_chat["hi"] = [2]
    assert lines(old, new) == [
        f"{HELLO}: the case definition changed (hash cb58198f45a6 -> abc)",
        f"{HELLO}: replayable: '' -> 'no'",
        f"{HELLO}: verdict of the engine on its own case: pass -> fail",
        (
            f"{HELLO}: encode('Hello, world!'): "
            f"{old.cases[HELLO].inputs.encode['Hello, world!']} -> [1]"
        ),
        f"{HELLO}: encode_chat('hi'): None -> [2]",
    ]


def with_embedding(group, tokens, vectors):
    group = copy(group)
    group.cases[HELLO].inputs.embed = [Embedding(tokens, vectors)]
    return group


def test_embeddings_agree_within_float_rounding_and_no_further():
    old = with_embedding(stored(), [5, 6], [[0.0, 1.0], [2.0, -3.0]])
    inside = with_embedding(stored(), [5, 6], [[0.9 * EMBEDDING_ATOL, 1.0], [2.0, -3.0]])
    assert lines(old, inside) == []
    relative = with_embedding(stored(), [5, 6], [[0.0, 1.0], [2.0, -3.0 * (1 + 0.9e-5)]])
    assert lines(old, relative) == []
    outside = with_embedding(stored(), [5, 6], [[0.0, 1.0], [2.0, -3.0 * (1 + 2e-5)]])
    assert lines(old, outside) == [
        f"{HELLO}: embeddings of [5, 6] changed (largest |difference| 6e-05)"
    ]
    shape = with_embedding(stored(), [5, 6], [[0.0, 1.0]])
    assert lines(old, shape) == [f"{HELLO}: embeddings of [5, 6]: shape (2, 2) -> (1, 2)"]
    other = with_embedding(stored(), [5, 7], [[0.0, 1.0], [2.0, -3.0]])
    assert lines(old, other) == [
        f"{HELLO}: embeddings asked for other tokens: [(5, 6)] -> [(5, 7)]"
    ]


def test_the_smallest_margin_is_compared_with_the_logprob_tolerance():
    old = stored()
    margin = old.cases[HELLO].conditioning["min_margin"]
    tolerance = get_profile("fp32").logprob_tolerance(margin)
    new = copy(old)
    new.cases[HELLO].conditioning["min_margin"] = margin + 0.9 * tolerance
    assert lines(old, new) == []
    new.cases[HELLO].conditioning["min_margin"] = margin + 1.1 * tolerance
    new.cases[HELLO].conditioning["step"] = 4
    assert lines(old, new) == [
        (
            f"{HELLO}: smallest greedy margin {margin:.6g} (step 9) -> "
            f"{margin + 1.1 * tolerance:.6g} (step 4)"
        )
    ]
    new.cases[HELLO].conditioning = None
    assert lines(old, new) == [f"{HELLO}: conditioning {old.cases[HELLO].conditioning} -> None"]
    assert lines(new, copy(new)) == []


def test_answers_whose_request_changed_are_not_compared_further():
    old = stored()
    new = copy(old)
    answer = new.cases[HELLO].answers[0]
    answer.request = {**answer.request, "max_tokens": 25}
    answer.trace.events[0] = replace(answer.trace.events[0], token=3)
    assert [(d.what, d.details) for d in compare_groups(old, new, decode).differences] == [
        (
            f"{WHERE}: the request changed",
            f"now: {PROMPT}, max_tokens=25",
        )
    ]
    new = copy(old)
    new.cases[HELLO].answers[0].top_logprobs = 5
    assert lines(old, new)[0].startswith(f"{HELLO}: {WHERE}: the request changed\n    now: ")
    new = copy(old)
    new.cases[HELLO].answers[0].request = {"prompt": list(range(100))}
    # Requests are cut at 120 characters.
    cut = f"prompt={list(range(100))}"[:120] + "..."
    assert lines(old, new)[0].endswith(f"the request changed\n    now: {cut}")
    assert len(f"prompt={list(range(100))}") > 120
    new.cases[HELLO].answers.append(new.cases[HELLO].answers[0])
    assert lines(old, new)[0] == f"{HELLO}: 1 answers in the snapshot, 2 now"


def test_a_failed_comparison_carries_the_comparators_diagnostic_indented():
    old = stored()
    new = copy(old)
    events = new.cases["greedy/fox"].answers[0].trace.events
    events[2] = replace(events[2], token=events[2].top_logprobs[1][0])
    result = compare_groups(old, new, decode)
    [difference] = result.differences
    live = compare_traces(
        old.cases["greedy/fox"].answers[0].trace,
        new.cases["greedy/fox"].answers[0].trace,
        get_profile("fp32"),
        decode,
        expected_label="snapshot",
        actual_label="now",
    )
    assert difference.case_id == "greedy/fox" and difference.what.endswith(":")
    assert difference.details == live.render("snapshot", "now")
    assert difference.render() == "greedy/fox: " + difference.what + "\n" + "\n".join(
        "    " + line for line in live.render("snapshot", "now").splitlines()
    )
    assert not result.matches and result.render() == difference.render()


def test_a_near_tie_taken_the_other_way_is_a_note_not_a_difference():
    old = copy(stored())
    events = old.cases["greedy/fox"].answers[0].trace.events
    (first, lp1), (second, _) = events[2].top_logprobs[:2]
    tied = [(first, lp1), (second, lp1 - 0.001), *events[2].top_logprobs[2:]]
    events[2] = replace(events[2], top_logprobs=tied)
    new = copy(old)
    other = new.cases["greedy/fox"].answers[0].trace.events
    other[2] = replace(other[2], token=second, logprob=lp1 - 0.001)
    result = compare_groups(old, new, decode)
    assert result.matches and len(result.near_ties) == 1
    note = result.near_ties[0]
    assert note.case_id == "greedy/fox" and note.what.startswith("answer 0 (generate ")
    assert result.render() == "near-tie (accepted): " + note.render()
    # A near-tie note comes after the differences.
    new.cases[HELLO].verdict = "fail"
    rendered = compare_groups(old, new, decode).render().splitlines()
    assert rendered[0] == f"{HELLO}: verdict of the engine on its own case: pass -> fail"
    assert rendered[1].startswith("near-tie (accepted): greedy/fox: answer 0")


def test_text_and_draft_flags_of_shared_steps_must_be_equal_and_the_first_change_is_named():
    old = stored()
    events = old.cases[HELLO].answers[0].trace.events
    new = copy(old)
    changed = new.cases[HELLO].answers[0].trace.events
    changed[1] = replace(changed[1], text="?")
    changed[4] = replace(changed[4], from_draft=True)
    assert lines(old, new) == [
        f"{HELLO}: {WHERE}: step 1 (token {events[1].token}) text {events[1].text!r} -> '?'"
    ]
    new = copy(old)
    last = len(events) - 1
    changed = new.cases[HELLO].answers[0].trace.events
    changed[last] = replace(changed[last], from_draft=True)
    assert lines(old, new) == [
        f"{HELLO}: {WHERE}: step {last} (token {events[last].token}) from_draft False -> True"
    ]


def test_a_difference_without_details_is_one_line():
    assert Difference("c", "what").render() == "c: what"
    assert Difference("c", "what", "a\nb").render() == "c: what\n    a\n    b"
    assert GroupComparison().matches
    assert not GroupComparison([Difference("c", "w")]).matches


def test_a_near_tie_note_and_a_failure_use_the_snapshots_labels_and_token_text():
    old = copy(stored())
    events = old.cases["greedy/fox"].answers[0].trace.events
    (first, lp1), (second, _) = events[2].top_logprobs[:2]
    events[2] = replace(events[2], top_logprobs=[(first, lp1), (second, lp1 - 0.001)])
    new = copy(old)
    other = new.cases["greedy/fox"].answers[0].trace.events
    other[2] = replace(other[2], token=second, logprob=lp1 - 0.001)
    shown = compare_groups(old, new, decode, token_text=lambda t: f"<{t}>")
    live = compare_traces(
        old.cases["greedy/fox"].answers[0].trace,
        new.cases["greedy/fox"].answers[0].trace,
        get_profile("fp32"),
        decode,
        expected_label="snapshot",
        actual_label="now",
        token_text=lambda t: f"<{t}>",
    )
    assert shown.near_ties[0].details == live.render("snapshot", "now")
    assert f"snapshot chose '<{first}>'" in shown.near_ties[0].details


def test_a_request_of_exactly_120_characters_is_shown_whole():
    old = stored()
    new = copy(old)
    new.cases[HELLO].answers[0].request = {"p": "x" * 118}  # "p=xxx...": 120 characters
    assert lines(old, new)[0].endswith("the request changed\n    now: p=" + "x" * 118)
