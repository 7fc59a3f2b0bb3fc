r"""Reports of a conformance run: terminal matrix, JSON, Markdown, JUnit XML.

All four are views of the same list of ``CaseResult``s. The terminal matrix
is one table per model, a row per case and a column per engine, cut into
several tables where the engines would not fit ``MATRIX_WIDTH`` columns; a
cell is pass, near-tie, FAIL, unsupported or skipped (engine not installed),
and a legend below says so. Engines are shown by their short label (a ``cmd:``
engine by the name its hello gives); reports that are data (JSON, JUnit)
keep the full spec. Markdown has one table for all models (blank: the case
does not run on that model) and, for every fail and near-tie, the full
diagnostic; JSON holds everything, diagnostics as structured data.

Engines print whatever they like (their stderr tail ends up in diagnostics),
so every text is made safe for the format it goes into: control characters
other than newline and tab are written as ``\xNN`` in the terminal, Markdown
and JUnit views (XML 1.0 cannot hold them at all, a terminal would obey
them), Markdown table cells escape ``|``, and code blocks get a fence longer
than any run of backticks inside. Each report file is written whole or not
at all: to a temporary file beside it, then renamed over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from conformance.comparator import FAIL, NEAR_TIE, PASS
from conformance.profiles import PROFILES
from conformance.runner import SKIPPED, UNSUPPORTED, CaseResult

CELL = {
    PASS: "pass",
    NEAR_TIE: "near-tie",
    FAIL: "FAIL",
    UNSUPPORTED: "unsupported",
    SKIPPED: "skipped",
}


# Characters no report may carry raw: C0 controls but tab and newline, DEL, C1 controls,
# lone surrogates and the two non-characters XML 1.0 excludes.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def safe_text(text: str) -> str:
    r"""``text`` with unsafe characters written as visible escapes (``\x1b``, ``\ud800``)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all: a temporary file, then a rename."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


MATRIX_WIDTH = 100  # terminal columns the matrix fits in (engines beyond go to another table)
GAP = "  "
LEGEND = (
    "pass: agrees with the reference; near-tie: passes, parted from it where the reference's\n"
    "top two tokens are closer than the profile's epsilon; FAIL: disagrees (diagnostics below);\n"
    "unsupported: the engine lacks a capability the case needs; skipped: the engine (or the\n"
    "case's snapshot) is not available"
)
LEGEND_STAR = "*: ill-conditioned case (the reference's own margin is under the epsilon; see below)"
LEGEND_BLANK = (
    "blank: no result (the case is not in that model's catalogue, or the run stopped first)"
)


def columns(results: list[CaseResult]) -> list[tuple[str, str]]:
    """(engine, model) pairs in the order they were run."""
    seen: dict[tuple[str, str], None] = {}
    for r in results:
        seen.setdefault((r.engine, r.model), None)
    return list(seen)


def case_rows(results: list[CaseResult]) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        seen.setdefault(r.case_id, None)
    return list(seen)


def counts(results: list[CaseResult]) -> dict[str, int]:
    totals = {v: 0 for v in CELL}
    for r in results:
        totals[r.verdict] += 1
    return totals


def any_failed(results: list[CaseResult]) -> bool:
    return any(r.verdict == FAIL for r in results)


def engine_labels(results: list[CaseResult]) -> dict[str, str]:
    """Each engine's short name for tables, by its full spec; equal names get ``#2``, ``#3``.

    A ``cmd:`` engine's spec is its whole command line; its label is the name its
    hello gives (``CaseResult.label``).
    """
    labels: dict[str, str] = {}
    for r in results:
        if r.engine not in labels:
            label, n = r.engine_label, 1
            while label in labels.values():
                n += 1
                label = f"{r.engine_label}#{n}"
            labels[r.engine] = label
    return labels


def _cell(r: CaseResult | None) -> str:
    return "" if r is None else CELL[r.verdict] + ("*" if r.ill_conditioned else "")


def _grid(results: list[CaseResult]) -> tuple[list[str], list[list[str]]]:
    """One row per case, one column per (engine, model): the Markdown report's matrix."""
    cols = columns(results)
    labels = engine_labels(results)
    index = {(r.case_id, r.engine, r.model): r for r in results}
    header = ["case", *[f"{labels[engine]} @ {model}" for engine, model in cols]]
    rows = [
        [case_id, *[_cell(index.get((case_id, e, m))) for e, m in cols]]
        for case_id in case_rows(results)
    ]
    return header, rows


def format_matrix(results: list[CaseResult]) -> str:
    """The matrix as aligned plain text: one table per model (cases x engines), each with
    its precision profile and a count of each verdict per engine, then the legend."""
    labels = engine_labels(results)
    out: list[str] = []
    for model in dict.fromkeys(r.model for r in results):
        of_model = [r for r in results if r.model == model]
        engines = list(dict.fromkeys(r.engine for r in of_model))
        if out:
            out.append("")
        out.append(f"{model} ({'; '.join(_profiles_used(of_model))})")
        for part in _fitting(of_model, engines, labels):
            out += _model_table(of_model, part, labels)
    out += _legend(results, blanks=_missing_per_model(results))
    return "\n".join(out)


def _fitting(results: list[CaseResult], engines: list[str], labels: dict[str, str]):
    """``engines`` in consecutive groups whose table fits ``MATRIX_WIDTH`` columns."""
    first = max(len("case"), *(len(r.case_id) for r in results))
    groups: list[list[str]] = [[]]
    width = first
    for engine in engines:
        column = len(GAP) + max(len(labels[engine]), len("unsupported"), len("near-tie*"))
        if groups[-1] and width + column > MATRIX_WIDTH:
            groups.append([])
            width = first
        groups[-1].append(engine)
        width += column
    return groups


def _model_table(results: list[CaseResult], engines: list[str], labels) -> list[str]:
    """Cases x ``engines`` for one model, then a row per verdict that occurs: its counts."""
    index = {(r.case_id, r.engine): r for r in results}
    header = ["case", *[labels[e] for e in engines]]
    rows = [
        [case_id, *[_cell(index.get((case_id, e))) for e in engines]]
        for case_id in case_rows(results)
    ]
    tallies = {e: counts([r for r in results if r.engine == e]) for e in engines}
    totals = [
        [f"total {CELL[verdict]}", *[str(tallies[e][verdict]) for e in engines]]
        for verdict in CELL
        if any(tallies[e][verdict] for e in engines)
    ]
    widths = [max(len(row[i]) for row in [header, *rows, *totals]) for i in range(len(header))]

    def line(cells):
        return GAP.join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    rule = line(["-" * w for w in widths])
    return [line(header), rule, *map(line, rows), rule, *map(line, totals)]


def _legend(results: list[CaseResult], blanks: bool) -> list[str]:
    """What the cells mean, which engine each short name stands for, ill-conditioned cases."""
    notes = ["", LEGEND]
    if blanks:
        notes.append(LEGEND_BLANK)
    renamed = {label: e for e, label in engine_labels(results).items() if label != e}
    if renamed:
        notes.append("engines by label:")
        notes += [_wrapped(f"{label} = {e}") for label, e in renamed.items()]
    ill = {}
    for r in results:
        if r.ill_conditioned and r.case_id not in ill:
            ill[r.case_id] = r.conditioning.describe()
    if ill:
        notes.append(LEGEND_STAR)
        notes += [_wrapped(f"{case_id}: {text}") for case_id, text in ill.items()]
    return notes


def _wrapped(note: str) -> str:
    """An indented note, folded at spaces to fit ``MATRIX_WIDTH`` columns."""
    return "\n".join(
        textwrap.wrap(note, MATRIX_WIDTH, initial_indent="  ", subsequent_indent="    ")
    )


def _missing_per_model(results: list[CaseResult]) -> bool:
    """Whether some engine has no result for a case another engine ran on the same model."""
    for model in dict.fromkeys(r.model for r in results):
        of_model = [r for r in results if r.model == model]
        cells = {(r.case_id, r.engine) for r in of_model}
        if len(cells) < len(case_rows(of_model)) * len(columns(of_model)):
            return True
    return False


def _profiles_used(results: list[CaseResult]) -> list[str]:
    """Each precision profile the results were judged with, and what it allows."""
    lines = []
    for name in dict.fromkeys(r.profile for r in results):
        p = PROFILES[name]
        probabilities = f" or probabilities within {p.prob_atol:g}" if p.prob_atol else ""
        lines.append(
            f"profile {name}: near-tie below {p.tie_epsilon:g} nats, logprobs within "
            f"{p.logprob_atol:g} + {p.logprob_rtol:g}*|logprob|{probabilities}"
        )
    return lines


def _footnotes(results: list[CaseResult]) -> list[str]:
    """Profiles per model, then the legend (for reports that show all models in one table)."""
    profiles = [
        f"{model}: {'; '.join(_profiles_used([r for r in results if r.model == model]))}"
        for model in dict.fromkeys(r.model for r in results)
    ]
    blanks = any("" in row for row in _grid(results)[1])
    return ["", "precision profiles: " + " | ".join(profiles), *_legend(results, blanks)]


def format_problems(results: list[CaseResult]) -> str:
    """Every fail and near-tie with its diagnostic, as plain text."""
    blocks = []
    labels = engine_labels(results)
    for r in results:
        if r.verdict not in (FAIL, NEAR_TIE):
            continue
        where = f"{labels[r.engine]} @ {r.model}"
        lines = [f"{CELL[r.verdict]}: {r.case_id} on {where} (profile {r.profile})"]
        if r.reason:
            lines += ["  " + line for line in r.reason.splitlines()]
        for f in r.findings:
            if f.verdict in (FAIL, NEAR_TIE):
                lines.append(f"  [{f.check}]")
                lines += ["    " + line for line in f.details.splitlines()]
        blocks.append("\n".join(lines))
    return safe_text("\n\n".join(blocks))  # an engine's escape sequences stay inert


# -- JSON ---------------------------------------------------------------------------------


def to_json(results: list[CaseResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "totals": counts(results),
        "results": [_plain(dataclasses.asdict(r)) for r in results],
    }


def write_json(path: str | Path, results: list[CaseResult], meta: dict[str, Any]) -> None:
    text = json.dumps(to_json(results, meta), indent=2, ensure_ascii=False, default=str)
    write_atomically(path, text + "\n")


def _plain(value: Any) -> Any:
    """JSON-safe: infinities become strings (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- Markdown -----------------------------------------------------------------------------


def to_markdown(results: list[CaseResult], meta: dict[str, Any]) -> str:
    header, rows = _grid(results)
    labels = engine_labels(results)
    out = ["# lmconform conformance report", ""]
    for key, value in meta.items():
        out.append(f"- **{key}**: {_md_inline(_md_value(value))}")
    out += ["", "## Matrix", ""]
    out.append("| " + " | ".join(_md_table(h) for h in header) + " |")
    out.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        out.append(
            "| "
            + " | ".join(_md_code(row[0]) if i == 0 else _md_cell(c) for i, c in enumerate(row))
            + " |"
        )
    out += [line for line in _footnotes(results)]
    problems = [r for r in results if r.verdict in (FAIL, NEAR_TIE)]
    if problems:
        out += ["", "## Failures and near-ties", ""]
        for r in problems:
            where = _md_inline(f"{labels[r.engine]} @ {r.model}")
            out.append(f"### {CELL[r.verdict]}: {_md_code(r.case_id)} on {where}")
            block = [r.reason] if r.reason else []
            for f in r.findings:
                if f.verdict in (FAIL, NEAR_TIE):
                    block += [f"[{f.check}]", f.details]
            out += ["", _md_inline(r.about), "", _md_block("\n".join(block)), ""]
    unsupported = [r for r in results if r.verdict in (UNSUPPORTED, SKIPPED)]
    if unsupported:
        out += ["", "## Unsupported and skipped", ""]
        for r in unsupported:
            where = _md_inline(f"{labels[r.engine]} @ {r.model}")
            out.append(f"- {_md_code(r.case_id)} on {where}: {_md_inline(r.reason)}")
    return "\n".join(out) + "\n"


def write_markdown(path: str | Path, results: list[CaseResult], meta: dict[str, Any]) -> None:
    write_atomically(path, to_markdown(results, meta))


def _md_inline(text: str) -> str:
    """One line of Markdown prose: newlines become spaces, HTML and pipes cannot act."""
    text = " ".join(safe_text(text).splitlines())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _md_table(text: str) -> str:
    return _md_inline(text)


def _md_code(text: str) -> str:
    """Inline code that holds any text: a backtick fence longer than any run inside."""
    text = " ".join(safe_text(text).splitlines()).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_block(text: str) -> str:
    """A fenced code block that no text inside can close early."""
    text = safe_text(text)
    fence = "`" * max(3, max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence}\n{text}\n{fence}"


def _md_cell(cell: str) -> str:
    return f"**{cell}**" if cell.startswith("FAIL") else _md_table(cell)


def _md_value(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


# -- JUnit XML ------------------------------------------------------------------------------


def to_junit(results: list[CaseResult]) -> ET.ElementTree:
    """One test suite per engine and model; unsupported and skipped cases are <skipped>."""
    root = ET.Element("testsuites", name="lmconform")
    for engine, model in columns(results):
        group = [r for r in results if (r.engine, r.model) == (engine, model)]
        c = counts(group)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"{engine}@{model}",
            tests=str(len(group)),
            failures=str(c[FAIL]),
            skipped=str(c[UNSUPPORTED] + c[SKIPPED]),
            errors="0",
            time=f"{sum(r.duration_s for r in group):.3f}",
        )
        for r in group:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"lmconform.{engine}.{model}",
                name=r.case_id,
                time=f"{r.duration_s:.3f}",
            )
            if r.verdict == FAIL:
                failing = r.failures()
                message = failing[0].summary if failing else r.reason.splitlines()[0]
                details = "\n".join(
                    [r.reason, *[f"[{f.check}]\n{f.details}" for f in failing]]
                ).strip()
                ET.SubElement(case, "failure", message=message).text = details
            elif r.verdict in (UNSUPPORTED, SKIPPED):
                ET.SubElement(case, "skipped", message=r.reason)
            elif r.verdict == NEAR_TIE:
                notes = "\n".join(f"[{f.check}]\n{f.details}" for f in r.near_ties())
                ET.SubElement(case, "system-out").text = f"near-tie (passes):\n{notes}"
    _xml_safe(root)
    ET.indent(root)
    return ET.ElementTree(root)


def _xml_safe(element: ET.Element) -> None:
    """Escape, in every text and attribute, the characters XML 1.0 cannot hold."""
    for node in element.iter():
        node.attrib = {k: safe_text(v) for k, v in node.attrib.items()}
        if node.text:
            node.text = safe_text(node.text)


def write_junit(path: str | Path, results: list[CaseResult]) -> None:
    text = ET.tostring(to_junit(results).getroot(), encoding="unicode")
    write_atomically(path, "<?xml version='1.0' encoding='utf-8'?>\n" + text + "\n")
