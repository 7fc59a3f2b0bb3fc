"""The case catalogue: cases are data (``cases.toml``), turned into requests here.

A case names a *kind* of check (see ``checks/``), the models it runs on, and a
request written for humans: prompts as text, tokens by their text, and
tokens taken from the reference's own greedy path. Turning that into exact
token ids needs the reference (its tokenizer, its embeddings, its greedy
output); anything that can do those four things serves as the ``Oracle``.

Request fields in the data (besides every ``GenerateRequest`` field):

- ``prompt = "text"``: encoded with the tokenizer (as mlx-lm encodes a string);
- ``chat = "text"``: a user message through the chat template;
- ``prompt_tokens = [ids]``: token ids as they are;
- ``prompt_embeddings = "from_tokens"``: the model's own embedding rows of the
  prompt (the request then carries embeddings only); ``"blend"``: vectors that
  are no token's embedding (each position mixes two neighbouring rows);
- a token may be written as an id, as ``"@token:TEXT"`` (the one token that
  TEXT encodes to), or as ``"@greedy[k]"``: the token the reference picks at
  step k for the same request without the fields that use ``@greedy``.

Besides the cases written out, ``[combinations]`` in ``cases.toml`` declares
variants (a feature and how it enters a request) and which pairs of them do not
compose; ``combination_cases`` generates one case per remaining pair
(``combo/A+B``), of the kind the pair's roles call for (see ``cases.toml``).
Likewise ``[agreement]`` names the models and position budgets for which
``agreement_cases`` makes one case per text of ``agreement_texts/``.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from conformance.agreement import load_texts
from engines.protocol import DraftSettings, GenerateRequest, ProcessorSettings, SamplerSettings

CASES_FILE = Path(__file__).with_name("cases.toml")
KINDS = (
    "equivalence",
    "stream",
    "invariance",
    "batch",
    "prompt_cache",
    "seed",
    "distribution",
    "score",
    "agreement",
    "request_validation",
)
CASE_KEYS = {"id", "kind", "models", "about", "request", "expect", "params"}
ROLES = ("check", "shape", "invariant")
GREEDY_REF = re.compile(r"^@greedy\[(\d+)\]$")
TOKEN_REF = re.compile(r"^@token:(.+)$", re.DOTALL)


@dataclass
class Case:
    id: str
    kind: str
    models: list[str]
    about: str
    request: dict[str, Any]  # the request as written in the data (see module docstring)
    params: dict[str, Any] = field(default_factory=dict)  # kind-specific settings
    expect: dict[str, Any] = field(default_factory=dict)  # what the reference's answer must show

    @property
    def group(self) -> str:
        return self.id.split("/", 1)[0]


class CatalogueError(Exception):
    """A case is malformed, or no longer does what it says (e.g. the reference changed)."""


class Oracle(Protocol):
    """What turning a case into requests needs from the reference."""

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, text: str) -> list[int]: ...

    def embed(self, tokens: list[int]) -> np.ndarray: ...

    def greedy_tokens(self, request: GenerateRequest) -> list[int]: ...


def load_cases(path: Path = CASES_FILE) -> list[Case]:
    """All cases of the catalogue (written and generated), checked for the fields every
    case needs."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    cases = (
        _written_cases(data)
        + combination_cases(data.get("combinations", {}))
        + agreement_cases(data.get("agreement", {}))
    )
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise CatalogueError(f"duplicate case ids: {sorted(duplicates)}")
    return cases


def _written_cases(data: dict[str, Any]) -> list[Case]:
    cases = []
    for raw in data.get("case", []):
        unknown = set(raw) - CASE_KEYS
        if unknown:
            raise CatalogueError(f"case {raw.get('id')!r}: unknown keys {sorted(unknown)}")
        for key in ("id", "kind", "models", "about", "request"):
            if key not in raw:
                raise CatalogueError(f"case {raw.get('id')!r} lacks {key!r}")
        if raw["kind"] not in KINDS:
            raise CatalogueError(
                f"case {raw['id']!r}: unknown kind {raw['kind']!r}; kinds: {KINDS}"
            )
        cases.append(
            Case(
                id=raw["id"],
                kind=raw["kind"],
                models=list(raw["models"]),
                about=" ".join(raw["about"].split()),
                request=raw["request"],
                params=raw.get("params", {}),
                expect=raw.get("expect", {}),
            )
        )
    return cases


# -- combinations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One feature as it enters a request (see ``[combinations]`` in cases.toml)."""

    name: str
    role: str  # "check", "shape" or "invariant"
    kind: str | None = None  # the kind of check, for role "check"
    request: dict[str, Any] = field(default_factory=dict)  # fields added to the request
    params: dict[str, Any] = field(default_factory=dict)  # the check's params, role "check"


def combination_cases(spec: dict[str, Any]) -> list[Case]:
    """One case per pair of variants that composes, for each model that asks for it."""
    if not spec:
        return []
    variants = {v["name"]: _variant(v) for v in spec.get("variant", [])}
    excluded = {}
    for entry in spec.get("exclude", []):
        pair = frozenset(entry["pair"])
        if not pair <= set(variants):
            raise CatalogueError(f"combinations.exclude names unknown variants {entry['pair']}")
        excluded[pair] = entry["why"]
    by_pair: dict[str, Case] = {}
    for model in spec.get("model", []):
        base = {k: model.get(k, spec.get(k)) for k in ("prompt", "max_tokens", "rows")}
        for a, b in _pairs(model["pairs"], variants, excluded):
            # A model with inputs of its own (id_prefix) gets cases of its own.
            case = _combination(variants[a], variants[b], base, model.get("id_prefix", ""))
            by_pair.setdefault(case.id, case).models.append(model["name"])
    return list(by_pair.values())


def _variant(raw: dict[str, Any]) -> Variant:
    variant = Variant(
        raw["name"], raw["role"], raw.get("kind"), raw.get("request", {}), raw.get("params", {})
    )
    if variant.role not in ROLES:
        raise CatalogueError(f"variant {variant.name!r}: role must be one of {ROLES}")
    if (variant.role == "check") != (variant.kind in KINDS):
        raise CatalogueError(f"variant {variant.name!r}: a check variant needs a kind, and only it")
    return variant


def _pairs(asked, variants: dict[str, Variant], excluded) -> list[tuple[str, str]]:
    """The pairs a model asks for ("all": every pair not excluded), in declaration order."""
    order = list(variants)
    if asked == "all":
        pairs = [p for p in itertools.combinations(order, 2) if frozenset(p) not in excluded]
    else:
        pairs = [tuple(sorted(p, key=order.index)) for p in asked]
    for a, b in pairs:
        if frozenset((a, b)) in excluded:
            raise CatalogueError(f"pair {a} x {b} is excluded: {excluded[frozenset((a, b))]}")
        checks = [variants[v] for v in (a, b) if variants[v].role == "check"]
        if len(checks) == 2 and {c.name for c in checks} != {"batch", "prompt_cache"}:
            raise CatalogueError(f"pair {a} x {b}: two checks that cannot hold each other")
    return pairs


def _combination(a: Variant, b: Variant, base: dict[str, Any], prefix: str) -> Case:
    """The case for one pair: its kind from the roles, its request from the base request."""
    # A check variant decides the kind; otherwise a shape x invariant pair compares the
    # invariant against the shaped request, and two of a role go together.
    checks = [v for v in (a, b) if v.role == "check"]
    shapes = [v for v in (a, b) if v.role == "shape"]
    invariants = [v for v in (a, b) if v.role == "invariant"]
    request = {"prompt": base["prompt"], "max_tokens": base["max_tokens"]}
    added = _merged(*(v.request for v in (a, b)))
    params: dict[str, Any] = {}
    about = f"{a.name} combined with {b.name}"
    if {c.name for c in checks} == {"batch", "prompt_cache"}:
        kind = "batch"
        params["rows"] = [{**row, "cache_prefix": 2} for row in base["rows"]]
        request = dict(base["rows"][0])
        about += ": each row reuses a cache warmed with its prompt's first 2 tokens"
    elif checks:
        kind = checks[0].kind
        params = copy.deepcopy(checks[0].params)
        if kind == "batch":
            params["rows"] = [_merged(row, added) for row in base["rows"]]
            request = params["rows"][0]
            about += ": rows of different lengths each equal their single run"
        else:
            request = _merged(request, added)
    elif invariants and shapes:
        kind = "invariance"
        request = _merged(request, *(v.request for v in shapes))
        params["variants"] = [_merged(*(v.request for v in invariants))]
        about += f": with {invariants[0].name} the answer equals the answer without it"
    elif invariants:
        kind = "invariance"
        params["variants"] = [added]
        about += ": together they give the plain answer"
    else:
        kind = "equivalence"
        request = _merged(request, added)
    return Case(f"combo/{prefix}{a.name}+{b.name}", kind, [], about + ".", request, params)


def _merged(*parts: dict[str, Any]) -> dict[str, Any]:
    """Request fields merged; nested tables (processors) merge key by key."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in copy.deepcopy(part).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "draft":
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


# -- agreement --------------------------------------------------------------------------


def agreement_cases(spec: dict[str, Any]) -> list[Case]:
    """One ``agreement/<prefix><text>`` case per plain text of ``agreement_texts/`` (or the
    model's ``texts``), for each model of ``[agreement]``. The request's prompt is the
    text itself, so the case's definition (and a snapshot's staleness) follows the file.
    Chats are left out: an oracle renders one user message only (``encode_chat``)."""
    texts = {t.name.split(".")[0]: t.content for t in load_texts() if isinstance(t.content, str)}
    by_id: dict[str, Case] = {}
    for model in spec.get("model", []):
        names = model.get("texts", list(texts))
        unknown = sorted(set(names) - set(texts))
        if unknown:
            raise CatalogueError(f"agreement: no plain text {unknown}; texts: {sorted(texts)}")
        for name in names:
            params = {"text": name, "positions": int(model["positions"])}
            case = Case(
                id=f"agreement/{model.get('id_prefix', '')}{name}",
                kind="agreement",
                models=[],
                about=(
                    f"Teacher-forced top logprobs over the first {params['positions']} "
                    f"positions of the {name} text agree with the reference's within the "
                    "profile's limits on KL, top-1 and |dp| (PROTOCOL.md, J6)."
                ),
                request={"prompt": texts[name]},
                params=params,
            )
            case = by_id.setdefault(case.id, case)
            if case.params != params:
                raise CatalogueError(f"{case.id}: models sharing it ask for other positions")
            case.models.append(model["name"])
    return list(by_id.values())


def select_cases(cases: list[Case], model: str, pattern: str | None = None) -> list[Case]:
    """The cases that run on ``model``, filtered by glob patterns (comma-separated)."""
    chosen = [c for c in cases if model in c.models]
    if pattern:
        globs = [p.strip() for p in pattern.split(",") if p.strip()]
        chosen = [c for c in chosen if any(_matches(c.id, g) for g in globs)]
    return chosen


def _matches(case_id: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(case_id, pattern)
    return pattern in case_id


def build_request(spec: dict[str, Any], oracle: Oracle, **overrides: Any) -> GenerateRequest:
    """The concrete ``GenerateRequest`` for a request written as in the catalogue."""
    spec = {**copy.deepcopy(spec), **overrides}
    if _uses_greedy_refs(spec):
        plain = {k: v for k, v in spec.items() if not _uses_greedy_refs(v)}
        path = oracle.greedy_tokens(build_request(plain, oracle))
        spec = _resolve_refs(spec, lambda ref: _greedy_token(ref, path))
    spec = _resolve_refs(spec, lambda ref: _text_token(ref, oracle))

    prompt = _prompt_tokens(spec, oracle)
    embeddings = None
    kind = spec.pop("prompt_embeddings", None)
    if kind is not None:
        embeddings = _embeddings(kind, prompt, oracle)
        prompt = []
    sampler = SamplerSettings(**spec.pop("sampler", {}))
    processors = spec.pop("processors", {})
    bias = {int(k): float(v) for k, v in processors.pop("logit_bias", {}).items()}
    draft = spec.pop("draft", None)
    return GenerateRequest(
        prompt=prompt,
        prompt_embeddings=embeddings,
        sampler=sampler,
        processors=ProcessorSettings(logit_bias=bias, **processors),
        draft=DraftSettings(**draft) if draft else None,
        stop_tokens=[int(t) for t in spec.pop("stop_tokens", [])],
        stop_sequences=[[int(t) for t in s] for s in spec.pop("stop_sequences", [])],
        **spec,
    )


def random_prompts(
    oracle: Oracle, count: int, seed: int, min_chars: int, max_chars: int
) -> list[list[int]]:
    """Prompts of random printable text (seeded), e.g. the other rows around a needle."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz     ,.ETAOINS0123456789"))
    prompts = []
    for _ in range(count):
        length = int(rng.integers(min_chars, max_chars + 1))
        prompts.append(oracle.encode("".join(rng.choice(alphabet, size=length))))
    return prompts


def _prompt_tokens(spec: dict[str, Any], oracle: Oracle) -> list[int]:
    given = [k for k in ("prompt", "chat", "prompt_tokens") if k in spec]
    if len(given) != 1:
        raise CatalogueError(
            f"a request needs exactly one of prompt, chat, prompt_tokens; got {given}"
        )
    if "prompt" in spec:
        return oracle.encode(spec.pop("prompt"))
    if "chat" in spec:
        return oracle.encode_chat(spec.pop("chat"))
    return [int(t) for t in spec.pop("prompt_tokens")]


def _embeddings(kind: str, tokens: list[int], oracle: Oracle) -> list[list[float]]:
    rows = oracle.embed(tokens)
    if kind == "from_tokens":
        return rows.tolist()
    if kind == "blend":
        # Each position mixes its own row with its neighbour's: vectors of the right
        # scale that are no token's embedding, as projected image features would be.
        mixed = 0.6 * rows + 0.4 * np.roll(rows, 1, axis=0)
        return mixed.astype(np.float32).tolist()
    raise CatalogueError(f"prompt_embeddings must be 'from_tokens' or 'blend', got {kind!r}")


def _uses_greedy_refs(value: Any) -> bool:
    if isinstance(value, str):
        return bool(GREEDY_REF.match(value))
    if isinstance(value, dict):
        return any(_uses_greedy_refs(k) or _uses_greedy_refs(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_uses_greedy_refs(v) for v in value)
    return False


def _resolve_refs(value: Any, resolve) -> Any:
    """Replace "@..." token references (in values and in dict keys) with token ids."""
    if isinstance(value, str) and value.startswith("@"):
        resolved = resolve(value)
        return value if resolved is None else resolved
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = resolve(k) if isinstance(k, str) and k.startswith("@") else None
            out[k if key is None else str(key)] = _resolve_refs(v, resolve)
        return out
    if isinstance(value, list):
        return [_resolve_refs(v, resolve) for v in value]
    return value


def _greedy_token(ref: str, path: list[int]) -> int | None:
    match = GREEDY_REF.match(ref)
    if not match:
        return None
    step = int(match.group(1))
    if step >= len(path):
        raise CatalogueError(f"{ref}: the reference's greedy path has only {len(path)} tokens")
    return path[step]


def _text_token(ref: str, oracle: Oracle) -> int | None:
    match = TOKEN_REF.match(ref)
    if not match:
        return None
    ids = oracle.encode(match.group(1))
    if len(ids) != 1:
        raise CatalogueError(f"{ref}: the text encodes to {len(ids)} tokens {ids}, not one")
    return ids[0]


def check_expectations(
    case: Case,
    tokens: list[int],
    finish_reason: str | None,
    text: str,
    smallest_margin: float | None = None,
) -> None:
    """Raise ``CatalogueError`` if the reference's answer no longer shows what the case needs.

    ``smallest_margin`` is the reference's smallest top-1/top-2 margin along its path
    (``conditioning.py``), for cases that need a near-tie (``smallest_margin_below``).
    """
    expect = case.expect
    problems = []
    if "smallest_margin_below" in expect and not (
        smallest_margin is not None and smallest_margin < expect["smallest_margin_below"]
    ):
        problems.append(
            f"smallest margin {smallest_margin}, expected below {expect['smallest_margin_below']}"
        )
    if "finish_reason" in expect and finish_reason != expect["finish_reason"]:
        problems.append(f"finish_reason {finish_reason!r}, expected {expect['finish_reason']!r}")
    if "length" in expect and len(tokens) != expect["length"]:
        problems.append(f"{len(tokens)} tokens, expected {expect['length']}")
    if "min_length" in expect and len(tokens) < expect["min_length"]:
        problems.append(f"{len(tokens)} tokens, expected at least {expect['min_length']}")
    if expect.get("multibyte_text") and not any(ord(ch) > 127 and ch != "\ufffd" for ch in text):
        problems.append(f"no multi-byte character in the text {text[:60]!r}")
    if problems:
        raise CatalogueError(
            f"case {case.id} no longer tests what it says: the reference's answer has "
            + "; ".join(problems)
        )
