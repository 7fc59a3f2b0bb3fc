"""Equivalent mutants in benchmarks/mutation.py: the record, how a survivor is matched to
it (name and mutated line), and how equivalents leave the score."""

from __future__ import annotations

from benchmarks import mutation

# `mutmut show` output for one mutant (its format: a status line, then a unified diff).
DIFF = """# reference.sampler.x_apply_min_p__mutmut_21: survived
--- reference/sampler.py
+++ reference/sampler.py
@@ -4,7 +4,7 @@
     drop = logprobs < threshold
-    if min_tokens_to_keep > 1:
+    if min_tokens_to_keep >= 1:
         best = mx.argpartition(logprobs, kth=-min_tokens_to_keep, axis=-1)[
"""

RECORD = """
[[mutant]]
name = "m.x_f__mutmut_1"
line = "if min_tokens_to_keep >= 1:"
why = "keeping the one best token is what min-p keeps anyway"

[[mutant]]
name = "m.x_f__mutmut_2"
line = "return a - b"
why = "recorded for an older version of f"
"""


def test_the_mutated_line_is_the_new_side_of_the_diff_without_the_file_header():
    assert mutation.mutated_line(DIFF) == "if min_tokens_to_keep >= 1:"


def test_the_record_is_read_by_mutant_name(tmp_path):
    path = tmp_path / "equivalents.toml"
    path.write_text(RECORD)
    found = mutation.load_equivalents(path)
    assert set(found) == {"m.x_f__mutmut_1", "m.x_f__mutmut_2"}
    assert found["m.x_f__mutmut_1"].why.startswith("keeping the one best token")
    assert mutation.load_equivalents(tmp_path / "absent.toml") == {}


def test_equivalents_leave_the_score_and_a_changed_mutant_does_not(tmp_path):
    path = tmp_path / "equivalents.toml"
    path.write_text(RECORD)
    score = mutation.ModuleScore(
        "m.py",
        counts={"killed": 8, "survived": 3},
        survivors=["m.x_f__mutmut_1", "m.x_f__mutmut_2", "m.x_f__mutmut_3"],
    )
    diffs = {
        "m.x_f__mutmut_1": DIFF,
        # The function changed: mutant 2 is now another change than the one recorded.
        "m.x_f__mutmut_2": "+++ m.py\n-    return a + b\n+    return a * b\n",
    }
    stale = mutation.set_aside_equivalents(
        score, diffs.__getitem__, mutation.load_equivalents(path)
    )
    assert stale == ["m.x_f__mutmut_2"]
    assert score.equivalent == ["m.x_f__mutmut_1"]
    assert score.survivors == ["m.x_f__mutmut_2", "m.x_f__mutmut_3"]
    # 8 killed of 11 ran, one of them equivalent: 8 of 10.
    assert (score.killed, score.checked) == (8, 10)
    assert score.score == 80.0
    assert "1 of them equivalent" in score.line()


def test_the_projects_record_names_each_mutant_once_with_a_reason():
    """A record written twice (two people appending at once) or without its reason would
    silently take a mutant out of the score."""
    tables = mutation.tomllib.loads(mutation.EQUIVALENTS.read_text())["mutant"]
    names = [t["name"] for t in tables]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    modules = {m.removesuffix(".py").replace("/", ".") for m in mutation.MODULE_TESTS}
    for table in tables:
        assert set(table) == {"name", "line", "why"}, table["name"]
        assert len(table["why"]) > 20, table["name"]
        module = table["name"].split(".x")[0]
        assert module in modules or f"{module.rsplit('.', 1)[0]}.*" in modules, table["name"]
    assert len(tables) == len(mutation.load_equivalents())
