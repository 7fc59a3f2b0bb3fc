"""Golden snapshots: an engine's answers to the case catalogue, stored as readable JSON.

The committed golden snapshots hold the *reference's* answers, so an engine
can be checked against them on a machine without MLX
(``lmconform check --against snapshots``), and the reference itself is
checked against them in CI (``tests/test_snapshots.py``, through syrupy).
``lmconform snapshot`` writes the same files for any engine.

Layout of a snapshot folder (the committed one is ``conformance/golden``)::

    <folder>/<model>/<group>.json           one file per case group: greedy, stopping, ...
    <folder>/<model>/vocabulary.json.gz     the model's tokens, to decode without a tokenizer

A group file holds, for each case of the group, everything the case asked of
the oracle while it ran: the token ids of its prompt texts, the embedding
vectors it used, and every answer (requests summarised for people, plus a hash
of the exact request that finds the answer again), step by step: token id,
text piece, chosen-token logprob, ``from_draft``, ``finish_reason`` and the top
logprobs. Logprobs are rounded on write to ``LOGPROB_DECIMALS`` decimals (the
comparison never needs more: its tightest tolerance is 2e-3). Embedding
vectors are written as the shortest decimals that give back the same float32
values, so a request built from them is bit-identical to the one recorded.
The case's conditioning (the reference's smallest top-1/top-2 margin) and
the verdict of the engine on its own case are recorded for the reader.

Full-vocabulary answers (the distribution checks ask for every token's
logprob) are stored whole only for vocabularies of up to
``MAX_STORED_VOCABULARY`` tokens: on ``smollm2-135m`` (49,152 tokens) one
would take 700 kB. Above that the answer keeps its top logprobs like any
other, and the case says it cannot be replayed (``not_replayable``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conformance.catalogue import Case
from conformance.snapshots.json_layout import dumps_readable
from engines.protocol import GenerateRequest, ProtocolError, ScoreRequest, TokenEvent, Trace
from engines.serialization import to_json_dict

FORMAT = "lmconform-golden/1"
GOLDEN_DIR = Path(__file__).parents[1] / "golden"
VOCABULARY_FILE = "vocabulary.json.gz"
GROUP_SUFFIX = ".json"
LOGPROB_DECIMALS = 6
MAX_STORED_VOCABULARY = 4096


class SnapshotError(Exception):
    """A snapshot file is missing, malformed, or of another format version."""


@dataclass
class Embedding:
    """The embedding rows the oracle gave for ``tokens`` (float32 values)."""

    tokens: list[int]
    vectors: list[list[float]]


@dataclass
class Inputs:
    """What turning a case into requests needed: tokenizations and embeddings."""

    encode: dict[str, list[int]] = field(default_factory=dict)
    encode_chat: dict[str, list[int]] = field(default_factory=dict)
    embed: list[Embedding] = field(default_factory=list)


@dataclass
class Answer:
    """One answer of the snapshotted engine: a generation, or the scores of a continuation."""

    kind: str  # "generate" or "score"
    request: dict[str, Any]  # for people: the request's non-default fields, embeddings abridged
    key: str  # hash of the exact request (``conformance.oracle.request_key``)
    top_logprobs: int
    trace: Trace


@dataclass
class CaseSnapshot:
    case_id: str
    kind: str
    about: str
    definition: str  # hash of the case as written in cases.toml: a changed case is stale
    verdict: str  # the snapshotted engine's verdict on the case, run against itself
    conditioning: dict[str, Any] | None
    inputs: Inputs
    answers: list[Answer]
    # Why the answers cannot stand in for the engine's in a replayed check ("" if they can).
    not_replayable: str = ""


@dataclass
class GroupSnapshot:
    model: str
    group: str
    engine: str  # which engine answered (its description)
    profile: str  # the precision profile the answers are compared with
    cases: dict[str, CaseSnapshot]


# -- identities ---------------------------------------------------------------------------


def case_definition(case: Case) -> str:
    """A hash of what a case asks (not its description, nor the models it runs on)."""
    written = {"kind": case.kind, "request": case.request, "params": case.params}
    written["expect"] = case.expect
    text = json.dumps(written, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def group_path(folder: Path, model: str, group: str) -> Path:
    return Path(folder) / model / f"{group}{GROUP_SUFFIX}"


def snapshot_groups(folder: Path, model: str) -> list[str]:
    """The case groups with a snapshot file for ``model`` in ``folder``."""
    return sorted(p.stem for p in (Path(folder) / model).glob(f"*{GROUP_SUFFIX}"))


# -- requests for people -------------------------------------------------------------------


def request_summary(request: GenerateRequest | ScoreRequest) -> dict[str, Any]:
    """The fields that differ from their defaults; embeddings shown by their shape only.

    ``top_logprobs`` and ``stream`` are left out: the oracle always asks for a
    streamed answer, and the answer records its own ``top_logprobs``.
    """
    summary = _non_default_fields(request)
    for name in ("top_logprobs", "stream"):
        summary.pop(name, None)
    vectors = summary.get("prompt_embeddings")
    if vectors:
        summary["prompt_embeddings"] = f"<{len(vectors)} vectors of {len(vectors[0])} floats>"
    return summary


def _non_default_fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields that are required or differ from their defaults, as JSON data."""
    shown = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.default is not MISSING and value == f.default:
            continue
        if f.default_factory is not MISSING and value == f.default_factory():
            continue
        shown[f.name] = _non_default_fields(value) if is_dataclass(value) else to_json_dict(value)
    return shown


# -- writing -------------------------------------------------------------------------------


def group_to_json(group: GroupSnapshot) -> str:
    """The group as the readable JSON text of its snapshot file."""
    data = {
        "format": FORMAT,
        "model": group.model,
        "group": group.group,
        "engine": group.engine,
        "profile": group.profile,
        "logprob_decimals": LOGPROB_DECIMALS,
        "cases": {case_id: _case_to_json(case) for case_id, case in sorted(group.cases.items())},
    }
    return dumps_readable(data, one_line_items=frozenset({"steps", "vectors"}))


def _case_to_json(case: CaseSnapshot) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if case.inputs.encode:
        inputs["encode"] = case.inputs.encode
    if case.inputs.encode_chat:
        inputs["encode_chat"] = case.inputs.encode_chat
    if case.inputs.embed:
        inputs["embed"] = [
            {"tokens": e.tokens, "vectors": [[_float32(v) for v in row] for row in e.vectors]}
            for e in case.inputs.embed
        ]
    return {
        "kind": case.kind,
        "about": case.about,
        "definition": case.definition,
        "verdict": case.verdict,
        "conditioning": _rounded(case.conditioning),
        **({"not_replayable": case.not_replayable} if case.not_replayable else {}),
        "inputs": inputs,
        "answers": [_answer_to_json(a) for a in case.answers],
    }


def _answer_to_json(answer: Answer) -> dict[str, Any]:
    trace = answer.trace
    return {
        "kind": answer.kind,
        "request": answer.request,
        "key": answer.key,
        "top_logprobs": answer.top_logprobs,
        "tokens": trace.tokens,
        "text": trace.text,
        "finish_reason": trace.finish_reason,
        "steps": [_step_to_json(e) for e in trace.events],
    }


def _step_to_json(event: TokenEvent) -> dict[str, Any]:
    step: dict[str, Any] = {"token": event.token, "text": event.text}
    step["logprob"] = _logprob(event.logprob)
    if event.from_draft is not None:
        step["from_draft"] = event.from_draft
    if event.finish_reason is not None:
        step["finish_reason"] = event.finish_reason
    if event.top_logprobs is not None:
        step["top"] = [[t, _logprob(lp)] for t, lp in event.top_logprobs]
    return step


def _logprob(value: float | None) -> float | str | None:
    if value is None:
        return None
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return round(float(value), LOGPROB_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32."""
    return float(str(np.float32(value)))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return _logprob(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_group(folder: Path, group: GroupSnapshot) -> Path:
    path = group_path(folder, group.model, group.group)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, group_to_json(group).encode("utf-8"))
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    """A snapshot file is whole or absent: a temporary file beside it, then a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------------


def group_from_json(text: str, where: str = "snapshot") -> GroupSnapshot:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnapshotError(f"{where}: not JSON ({error})") from None
    except RecursionError:
        raise SnapshotError(f"{where}: not JSON (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise SnapshotError(f"{where}: format {found!r}, expected {FORMAT!r}")
    problem = group_schema_problem(data)
    if problem:
        raise SnapshotError(f"{where}: {problem}")
    try:
        cases = {cid: _case_from_json(cid, c) for cid, c in data["cases"].items()}
        return GroupSnapshot(data["model"], data["group"], data["engine"], data["profile"], cases)
    except (KeyError, TypeError, ValueError, ProtocolError) as error:
        raise SnapshotError(f"{where}: malformed ({type(error).__name__}: {error})") from None


def read_group(folder: Path, model: str, group: str) -> GroupSnapshot:
    path = group_path(folder, model, group)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot file {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SnapshotError(f"{path}: cannot be read ({error})") from None
    snapshot = group_from_json(text, str(path))
    if (snapshot.model, snapshot.group) != (model, group):
        raise SnapshotError(
            f"{path}: holds model {snapshot.model!r}, group {snapshot.group!r}; its place "
            f"says model {model!r}, group {group!r}"
        )
    return snapshot


# -- the schema, checked before anything is read from a file ---------------------------------
# Each check returns None, or the first problem as "field path: what is wrong".


def group_schema_problem(data: dict[str, Any]) -> str | None:
    for name in ("model", "group", "engine", "profile"):
        if not isinstance(data.get(name), str):
            return f"{name}: expected a string, got {data.get(name)!r}"
    cases = data.get("cases")
    if not isinstance(cases, dict):
        return f"cases: expected an object, got {type(cases).__name__}"
    for case_id, case in cases.items():
        problem = _case_problem(case)
        if problem:
            return f"cases[{case_id!r}].{problem}"
    return None


def _case_problem(case: Any) -> str | None:
    if not isinstance(case, dict):
        return f"expected an object, got {type(case).__name__}"
    for name in ("kind", "about", "definition", "verdict"):
        if not isinstance(case.get(name), str):
            return f"{name}: expected a string, got {case.get(name)!r}"
    if not isinstance(case.get("not_replayable", ""), str):
        return "not_replayable: expected a string"
    if case.get("conditioning") is not None and not isinstance(case["conditioning"], dict):
        return "conditioning: expected an object or null"
    inputs = case.get("inputs", {})
    if not isinstance(inputs, dict):
        return "inputs: expected an object"
    for name in ("encode", "encode_chat"):
        table = inputs.get(name, {})
        if not isinstance(table, dict):
            return f"inputs.{name}: expected an object"
        for text, ids in table.items():
            if not _token_list(ids):
                return f"inputs.{name}[{text!r}]: expected a list of token ids"
    embed = inputs.get("embed", [])
    if not isinstance(embed, list):
        return "inputs.embed: expected a list"
    for i, item in enumerate(embed):
        if not isinstance(item, dict) or not _token_list(item.get("tokens")):
            return f"inputs.embed[{i}].tokens: expected a list of token ids"
        vectors = item.get("vectors")
        if not isinstance(vectors, list) or len(vectors) != len(item["tokens"]):
            return f"inputs.embed[{i}].vectors: expected one vector per token"
        if not all(isinstance(v, list) and all(_finite(x) for x in v) for v in vectors):
            return f"inputs.embed[{i}].vectors: expected lists of finite numbers"
    answers = case.get("answers")
    if not isinstance(answers, list):
        return "answers: expected a list"
    for i, answer in enumerate(answers):
        problem = _answer_problem(answer)
        if problem:
            return f"answers[{i}].{problem}"
    return None


def _answer_problem(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return f"expected an object, got {type(answer).__name__}"
    if answer.get("kind") not in ("generate", "score"):
        return f"kind: expected 'generate' or 'score', got {answer.get('kind')!r}"
    if not isinstance(answer.get("request"), dict):
        return "request: expected an object"
    if not isinstance(answer.get("key"), str) or not answer["key"]:
        return f"key: expected a request hash, got {answer.get('key')!r}"
    top = answer.get("top_logprobs")
    if not _count(top):
        return f"top_logprobs: expected a count, got {top!r}"
    steps = answer.get("steps")
    if not isinstance(steps, list):
        return "steps: expected a list"
    for i, step in enumerate(steps):
        problem = _step_problem(step, last=i == len(steps) - 1, kind=answer["kind"])
        if problem:
            return f"steps[{i}].{problem}"
    if answer["kind"] == "score":  # teacher-forced: one step per token of the continuation
        continuation = answer["request"].get("continuation", [])
        if [step["token"] for step in steps] != continuation:
            return (
                f"steps: a score answer has one step per token of its request's continuation "
                f"({len(continuation)} tokens), in order; got {len(steps)} steps that differ"
            )
    return None


def _step_problem(step: Any, last: bool, kind: str) -> str | None:
    if not isinstance(step, dict):
        return f"expected an object, got {type(step).__name__}"
    if not _count(step.get("token")):
        return f"token: expected a token id, got {step.get('token')!r}"
    if not isinstance(step.get("text", ""), str):
        return "text: expected a string"
    if not _logprob_ok(step.get("logprob")):
        return f"logprob: expected a log-probability or null, got {step.get('logprob')!r}"
    if step.get("from_draft") not in (None, True, False):
        return f"from_draft: expected true, false or null, got {step.get('from_draft')!r}"
    reason = step.get("finish_reason")
    if reason is not None and (reason not in ("stop", "length") or not last):
        return f"finish_reason: {reason!r} (only 'stop' or 'length', on the last step)"
    if kind == "generate" and last and reason is None:
        return "finish_reason: missing on the last step of a generation"
    top = step.get("top")
    if top is not None:
        if not isinstance(top, list):
            return "top: expected a list of [token id, logprob] pairs"
        for j, pair in enumerate(top):
            if not (isinstance(pair, list) and len(pair) == 2 and _count(pair[0])):
                return f"top[{j}]: expected [token id, logprob], got {pair!r}"
            if pair[1] is None or not _logprob_ok(pair[1]):
                return f"top[{j}]: logprob {pair[1]!r} is not a log-probability"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and all(_count(t) for t in value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _logprob_ok(value: Any) -> bool:
    """null, a finite number <= 0 (rounding slack 1e-6), or "-inf" (an impossible token)."""
    if value is None or value == "-inf":
        return True
    return _finite(value) and value <= 1e-6


def _case_from_json(case_id: str, data: dict[str, Any]) -> CaseSnapshot:
    raw = data.get("inputs", {})
    inputs = Inputs(
        encode={k: list(v) for k, v in raw.get("encode", {}).items()},
        encode_chat={k: list(v) for k, v in raw.get("encode_chat", {}).items()},
        embed=[Embedding(list(e["tokens"]), e["vectors"]) for e in raw.get("embed", [])],
    )
    answers = [
        Answer(a["kind"], a["request"], a["key"], a["top_logprobs"], _trace_from_json(a["steps"]))
        for a in data["answers"]
    ]
    return CaseSnapshot(
        case_id=case_id,
        kind=data["kind"],
        about=data["about"],
        definition=data["definition"],
        verdict=data["verdict"],
        conditioning=data.get("conditioning"),
        inputs=inputs,
        answers=answers,
        not_replayable=data.get("not_replayable", ""),
    )


def _trace_from_json(steps: list[dict[str, Any]]) -> Trace:
    events = []
    for step in steps:
        top = step.get("top")
        events.append(
            TokenEvent(
                token=int(step["token"]),
                logprob=_read_float(step.get("logprob")),
                top_logprobs=None if top is None else [(int(t), _read_float(lp)) for t, lp in top],
                text=step.get("text", ""),
                from_draft=step.get("from_draft"),
                finish_reason=step.get("finish_reason"),
            )
        )
    return Trace(events)


def _read_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[value]
    return float(value)


# -- the vocabulary ----------------------------------------------------------------------------


@dataclass
class VocabularyData:
    """A model's tokens as stored: enough to decode any token ids the way the reference does."""

    model: str
    vocab_size: int  # width of the model's logprob vectors (may exceed len(tokens))
    end_tokens: list[int]
    tokens: list[str]  # token id -> its piece in the vocabulary (byte-level spelling)
    added: dict[int, bool]  # ids matched whole by the tokenizer -> whether they are special
    decoder: str = "byte_level"


def write_vocabulary(folder: Path, vocabulary: VocabularyData) -> Path:
    path = Path(folder) / vocabulary.model / VOCABULARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(vocabulary)
    data["added"] = {str(k): v for k, v in vocabulary.added.items()}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # mtime=0: the same vocabulary gives byte-identical files (no spurious diffs).
    _write_atomically(path, gzip.compress(text.encode("utf-8"), mtime=0))
    return path


def read_vocabulary(folder: Path, model: str) -> VocabularyData:
    path = Path(folder) / model / VOCABULARY_FILE
    try:
        data = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"no vocabulary file {path}") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SnapshotError(f"{path}: not a gzipped JSON vocabulary ({error})") from None
    problem = _vocabulary_problem(data)
    if problem:
        raise SnapshotError(f"{path}: {problem}")
    data["added"] = {int(k): bool(v) for k, v in data["added"].items()}
    return VocabularyData(**data)


def _vocabulary_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "expected a JSON object"
    known = {f.name for f in fields(VocabularyData)}
    if set(data) - known or {"model", "vocab_size", "end_tokens", "tokens", "added"} - set(data):
        return f"fields {sorted(data)}; expected {sorted(known)}"
    size = data["vocab_size"]
    if not _count(size) or size == 0:
        return f"vocab_size: expected a positive integer, got {size!r}"
    tokens = data["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return "tokens: expected a list of strings"
    if len(tokens) > size:
        return f"tokens: {len(tokens)} of them, more than vocab_size {size}"
    if not _token_list(data["end_tokens"]) or any(t >= size for t in data["end_tokens"]):
        return f"end_tokens: expected token ids below {size}, got {data['end_tokens']!r}"
    added = data["added"]
    if not isinstance(added, dict) or not all(
        k.isdigit() and int(k) < len(tokens) for k in added
    ):
        return "added: expected an object keyed by token ids of the vocabulary"
    return None
