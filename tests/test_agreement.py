"""lmconform agree: agreement metrics against the reference, their tail bound and limits.

Engines are the reference itself, the reference with deterministic logit noise
(``agreement_engines.py``) and a mutant with a real teacher-forcing bug
(``mutants.ScoreSamePosition``); all on ``dummy``.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from agreement_engines import LargeNoise, NoScore
from conformance_helpers import decode_bytes, dummy_oracle, make_trace

import conformance
from conformance.agreement import (
    RESOLUTION,
    Position,
    Text,
    breaches,
    coarse_kl,
    exceeded,
    load_texts,
    measure,
    position,
    summarize,
    worst_position,
)
from conformance.comparator import FAIL, PASS, compare_traces
from conformance.profiles import PROFILES, AgreementLimits, get_profile
from engines.models import ModelSource
from lmconform.cli import main

SOURCE = ModelSource("dummy", "builtin")


def top_list(probs: dict[int, float], k: int) -> list[tuple[int, float]]:
    best = sorted(probs.items(), key=lambda item: -item[1])[:k]
    return [(t, math.log(p)) for t, p in best]


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


# -- the tail bound, on distributions built by hand -------------------------------------------

P = np.array([0.5, 0.2, 0.12, 0.08, 0.06, 0.04])
Q = np.array([0.4, 0.3, 0.05, 0.13, 0.07, 0.05])


def test_top_k_kl_merges_the_unshared_tokens_into_one_bin_and_is_a_lower_bound():
    reference = top_list(dict(enumerate(P)), 3)  # tokens 0, 1, 2
    engine = top_list(dict(enumerate(Q)), 3)  # tokens 0, 1, 3: only 0 and 1 are shared
    value, tail = coarse_kl(reference, engine)
    # By hand: bins {0}, {1}, {2, 3, 4, 5}; both rest bins hold 0.3.
    assert tail == pytest.approx(0.3)
    assert value == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.3))
    full = kl(P, Q)
    assert value < full
    # The gap is exactly the rest mass times the KL between the renormalised tails.
    rest = [2, 3, 4, 5]
    gap = 0.3 * kl(P[rest] / 0.3, Q[rest] / 0.3)
    assert full - value == pytest.approx(gap)


def test_lists_covering_the_whole_vocabulary_give_the_exact_kl():
    whole = len(P)
    value, tail = coarse_kl(top_list(dict(enumerate(P)), whole), top_list(dict(enumerate(Q)), whole))
    assert value == pytest.approx(kl(P, Q))
    assert tail < RESOLUTION


def test_a_normalisation_error_below_the_resolution_is_not_a_divergence():
    # The same distribution, one side's logprobs all shifted by float32-sized error.
    exact = top_list(dict(enumerate(P)), len(P))
    shifted = [(t, lp - 1e-6) for t, lp in exact]
    assert coarse_kl(exact, shifted)[0] < 1e-12
    assert coarse_kl(shifted, exact)[0] < 1e-12


def test_an_engine_without_the_reference_rest_mass_pays_for_it_at_the_resolution():
    # The reference keeps 0.2 outside its top 2; the engine claims its top 2 are all.
    reference = top_list({0: 0.5, 1: 0.3, 2: 0.2}, 2)
    engine = [(0, math.log(0.6)), (1, math.log(0.4))]
    value, tail = coarse_kl(reference, engine)
    expected = (
        0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / RESOLUTION)
    )
    assert tail == pytest.approx(0.2)
    assert value == pytest.approx(expected)


def test_a_top1_disagreement_records_the_reference_margin_it_crossed():
    reference = [(1, -0.2), (2, -0.5), (3, -3.0)]
    swapped = position("t", 1, reference, [(2, -0.3), (1, -0.4)], epsilon=0.1)
    assert not swapped.same_top and swapped.clear  # margin 0.3 >= 0.1
    assert swapped.crossed == pytest.approx(0.3)
    assert swapped.dp == pytest.approx(math.exp(-0.4) - math.exp(-0.2))
    # A token the reference does not list: at least the margin to its last listed one.
    assert position("t", 1, reference, [(9, -0.1)], epsilon=0.1).crossed == pytest.approx(2.8)
    assert position("t", 1, reference, reference, epsilon=0.1).crossed == 0.0


def at(index: int, kl: float = 0.0, dp: float = 0.0, crossed: float = 0.0,
       clear: bool = True) -> Position:
    return Position("t", index, kl, 0.0, crossed == 0.0, clear, dp, crossed)


def test_the_worst_position_is_the_one_that_most_breaks_the_named_limit():
    positions = [
        at(1, kl=0.5),
        at(2, dp=-0.4),
        at(3, crossed=0.2),
        at(4, crossed=0.9, clear=False),
        at(5, kl=0.1, dp=0.3),
    ]
    assert worst_position(positions, "KL mean").index == 1
    assert worst_position(positions, "KL p99").index == 1
    assert worst_position(positions, "|dp| p99").index == 2  # by magnitude
    assert worst_position(positions, "top-1 agreement").index == 4
    assert worst_position(positions, "top-1 agreement at clear positions").index == 3


def test_breaches_come_in_the_profile_tables_order_and_read_as_sentences():
    positions = [at(1, kl=0.5, dp=0.4, crossed=0.2), at(2)]
    broken = breaches(summarize(positions), get_profile("fp32").agreement)
    assert [b.metric for b in broken] == [
        "KL mean",
        "KL p99",
        "|dp| p99",
        "top-1 agreement",
        "top-1 agreement at clear positions",
    ]
    assert str(broken[0]) == "KL mean 0.25 > 1e-06"
    assert str(broken[-1]) == "top-1 agreement at clear positions 0.5 < 1"
    assert exceeded(summarize(positions), get_profile("fp32").agreement) == [
        str(b) for b in broken
    ]


# -- measuring engines on dummy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    return dummy_oracle()


def measured(oracle, engine, texts=None, positions=None, profile="fp32"):
    epsilon = get_profile(profile).tie_epsilon
    return measure(oracle.engine, engine, oracle.tokenizer, texts or load_texts(), epsilon,
                   positions=positions)


def test_the_shipped_texts_give_at_least_2000_positions_on_dummy_across_four_kinds(oracle):
    texts = load_texts()
    assert {t.name for t in texts} == {"prose", "code.py", "chat", "utf8"}
    chat = next(t for t in texts if t.name == "chat")
    assert "<|im_start|>assistant" in oracle.decode(chat.tokens(oracle.tokenizer))
    utf8 = next(t for t in texts if t.name == "utf8")
    assert len(utf8.tokens(oracle.tokenizer)) > 1.5 * len(utf8.content)  # multi-byte heavy
    assert sum(len(t.tokens(oracle.tokenizer)) - 1 for t in texts) >= 2000


def test_a_positions_budget_is_split_evenly_among_the_texts(oracle):
    summary, per_text, _ = measured(oracle, oracle.engine, positions=40)
    assert summary.positions == 40
    assert {s.positions for s in per_text.values()} == {10}


def test_teacher_forcing_by_one_token_generates_matches_score(oracle):
    text = Text("short", "Hello, world! The quick brown fox jumps over the lazy dog.")
    summary, _, _ = measured(oracle, NoScore(SOURCE), texts=[text])
    assert summary.positions == len(text.tokens(oracle.tokenizer)) - 1
    assert summary.kl_max < 1e-9 and summary.top1 == 1.0


def limits_around(value: float, name: str, factor: float) -> AgreementLimits:
    loose = AgreementLimits(kl_mean=math.inf, kl_p99=math.inf, dp_p99=math.inf,
                            top1_min=0.0, clear_top1_min=0.0)
    return replace(loose, **{name: value * factor})


FIGURE = {"kl_mean": "kl_mean", "kl_p99": "kl_p99", "dp_p99": "dp_p99",
          "top1_min": "top1", "clear_top1_min": "clear_top1"}


def test_each_limit_passes_at_a_tenth_inside_and_fails_at_a_tenth_outside(oracle):
    summary, _, _ = measured(oracle, LargeNoise(SOURCE), positions=400)
    assert {f.name for f in fields(AgreementLimits)} == set(FIGURE)
    for name, figure in FIGURE.items():
        value = getattr(summary, figure)
        assert value > 0, figure
        at_least = name.endswith("_min")
        inside, outside = (0.9, 1.1) if at_least else (1.1, 0.9)
        assert exceeded(summary, limits_around(value, name, inside)) == [], name
        assert len(exceeded(summary, limits_around(value, name, outside))) == 1, name


# -- q4q8: a probability tolerance besides the logprob one -----------------------------------


def test_only_q4q8_has_a_probability_tolerance():
    assert {p.name for p in PROFILES.values() if p.prob_atol} == {"q4q8"}


def test_a_rare_tokens_large_logprob_error_passes_q4q8_by_its_probability():
    # Measured on llama.cpp: a token of probability 0.008 moved by 0.40 nats.
    q4q8 = get_profile("q4q8")
    expected, actual = -4.85, -4.85 - 0.40
    assert abs(expected - actual) > q4q8.logprob_tolerance(expected)
    assert q4q8.logprobs_agree(expected, actual)
    assert not replace(q4q8, prob_atol=0.0).logprobs_agree(expected, actual)


@pytest.mark.parametrize("sign", [1, -1])
def test_the_probability_tolerance_passes_a_tenth_inside_and_fails_a_tenth_outside(sign):
    q4q8 = get_profile("q4q8")
    e = math.log(0.5)
    a, b = 65, 66
    for factor, verdict in ((0.9, PASS), (1.1, FAIL)):
        actual_p = 0.5 + sign * factor * q4q8.prob_atol
        actual = math.log(actual_p)
        assert abs(actual - e) > q4q8.logprob_tolerance(e)  # the logprob rule alone fails it
        tops = [[(a, -0.1)], [(b, e)]]
        result = compare_traces(
            make_trace([a, b], [-0.1, e], tops), make_trace([a, b], [-0.1, actual], tops),
            q4q8, decode_bytes,
        )
        assert result.verdict == verdict, (factor, result.summary)


def test_protocol_md_states_every_profiles_agreement_limits():
    text = (Path(conformance.__file__).with_name("PROTOCOL.md")).read_text()
    rows = re.findall(r"^  \| `(\w+)` \| ([\d.e-]+) \| ([\d.e-]+) \| ([\d.e-]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      text, re.MULTILINE)
    stated = {name: tuple(float(x) for x in numbers) for name, *numbers in rows}
    assert stated == {
        name: (p.agreement.kl_mean, p.agreement.kl_p99, p.agreement.dp_p99,
               p.agreement.top1_min, p.agreement.clear_top1_min)
        for name, p in PROFILES.items()
    }


# -- the command -------------------------------------------------------------------------------


def agree(tmp_path, engine: str, *more: str) -> tuple[int, dict]:
    report = tmp_path / "agree.json"
    rc = main(["agree", "--engine", engine, "--model", "dummy", "--json", str(report), *more])
    return rc, json.loads(report.read_text())


def test_the_reference_against_itself_agrees_exactly_in_every_report_and_the_history(
    tmp_path, capsys
):
    db = tmp_path / "history.sqlite"
    rc, report = agree(tmp_path, "reference", "--positions", "400", "--markdown",
                       str(tmp_path / "a.md"), "--junit", str(tmp_path / "a.xml"), "--db", str(db))
    out, _ = capsys.readouterr()
    assert rc == 0
    (result,) = report["results"]
    summary = result["summary"]
    assert summary["positions"] == 400
    assert summary["kl_max"] == 0 and summary["top1"] == 1.0 and summary["dp_max"] == 0
    assert set(result["per_text"]) == {"prose", "code.py", "chat", "utf8"}
    assert "reference @ dummy" in out and "pass" in out
    markdown = (tmp_path / "a.md").read_text()
    assert "| reference @ dummy | fp32 |" in markdown
    assert "| \\|dp\\| p99 |" in markdown  # a bar inside a cell is escaped
    assert "<failure" not in (tmp_path / "a.xml").read_text()
    with sqlite3.connect(db) as history:
        rows = dict(history.execute(
            "SELECT metric, value FROM samples WHERE engine = 'reference' AND model = 'dummy'"
            " AND workload = 'agreement'"
        ).fetchall())
    assert rows["kl_mean"] == 0 and rows["top1_mismatch_pct"] == 0


def test_float32_sized_noise_passes_but_is_measured(tmp_path):
    rc, report = agree(tmp_path, "agreement_engines:SmallNoise", "--no-history",
                       "--positions", "400")
    summary = report["results"][0]["summary"]
    assert rc == 0
    assert 0 < summary["kl_mean"] < get_profile("fp32").agreement.kl_mean


def test_large_noise_breaks_the_limits_in_every_report(tmp_path, capsys):
    rc, report = agree(tmp_path, "agreement_engines:LargeNoise", "--no-history", "--positions", "400",
                       "--markdown", str(tmp_path / "a.md"), "--junit", str(tmp_path / "a.xml"))
    out, _ = capsys.readouterr()
    assert rc == 1
    (result,) = report["results"]
    assert not result["passed"] and any(p.startswith("KL mean") for p in result["problems"])
    assert "FAIL agreement_engines:LargeNoise @ dummy: KL mean" in out
    assert "## Limits broken" in (tmp_path / "a.md").read_text()
    assert '<failure message="KL mean' in (tmp_path / "a.xml").read_text()


def test_a_teacher_forcing_bug_fails_top1_at_clear_positions(tmp_path):
    # Scores read one position late: what the engine predicts is the reference's next-next.
    rc, report = agree(tmp_path, "mutants:ScoreSamePosition", "--no-history", "--positions", "400")
    (result,) = report["results"]
    assert rc == 1
    assert result["summary"]["clear_top1"] < 0.5
    assert any(p.startswith("top-1 agreement at clear positions") for p in result["problems"])


def test_an_engine_without_the_top_logprobs_asked_for_is_a_finding(tmp_path, capsys):
    rc, report = agree(tmp_path, "agreement_engines:NoTopLogprobs", "--no-history",
                       "--positions", "8")
    out, _ = capsys.readouterr()
    assert rc == 1 and report["results"] == []
    assert report["not_measured"] == [
        "FAIL agreement_engines:NoTopLogprobs @ dummy: not measurable: no top logprobs at position 1"
    ]
    assert report["not_measured"][0] in out


@pytest.mark.parametrize(
    "options, named",
    [
        (["--top", "1"], "argument --top: expected a whole number in [2, 1000], got '1'"),
        (["--positions", "0"], "argument --positions: expected a whole number in [1, "),
    ],
)
def test_a_bad_number_is_refused_by_the_parser_naming_it_and_exit_2(options, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["agree", "--engine", "reference", "--no-history", *options])
    _, err = capsys.readouterr()
    assert stopped.value.code == 2
    assert named in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "options, named",
    [
        (["--model", "nosuch"], "--model 'nosuch'"),
        (["--profile", "fp8"], "--profile"),
        (["--engine", "nosuch"], "--engine nosuch"),
    ],
)
def test_bad_input_is_one_line_naming_it_and_exit_2(options, named, capsys):
    rc = main(["agree", "--engine", "reference", "--no-history", *options])
    _, err = capsys.readouterr()
    assert rc == 2
    assert named in err and len(err.strip().splitlines()) == 1


def test_a_file_that_is_not_a_history_is_refused_before_anything_runs(tmp_path, capsys):
    db = tmp_path / "notes.sqlite"
    db.write_text("not a database")
    rc = main(["agree", "--engine", "reference", "--db", str(db)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert f"--db {db}" in err and "not a usable history" in err


@pytest.mark.smollm
def test_llama_cpps_8_bit_activations_pass_q4q8s_limits_and_break_q4s():
    # 64 positions, 16 per text; over 512 the figures are in the README.
    from conformance.oracle import ReferenceOracle
    from engines.registry import open_engine

    oracle, engine = ReferenceOracle("smollm2-135m"), open_engine("llama-cpp", "smollm2-135m")
    try:
        q4q8, q4 = get_profile("q4q8"), get_profile("q4")
        summary, _, _ = measure(oracle.engine, engine, oracle.tokenizer, load_texts(),
                                q4q8.tie_epsilon, positions=64)
    finally:
        engine.close()
        oracle.close()
    assert summary.positions == 64
    assert exceeded(summary, q4q8.agreement) == []
    assert any(p.startswith("KL mean") for p in exceeded(summary, q4.agreement))
