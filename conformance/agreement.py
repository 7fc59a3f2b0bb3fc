"""Agreement metrics: how close an engine's next-token distributions are to the reference's.

A case judges one generation step by step; agreement judges the distributions
over many positions of fixed texts (``agreement_texts/``: prose, code, a chat
rendered with the model's template, UTF-8-heavy lines). Both engines are
teacher-forced on the same tokens, and at every position we compare their
top-k logprobs, after llama.cpp's ``llama-perplexity --kl-divergence``:

- KL(reference || engine): mean, median, 99th percentile, maximum;
- top-1 agreement: how often the engine's most likely token is the reference's,
  over all positions and over the *clear* ones (the reference's top-1/top-2
  margin at least the profile's ``tie_epsilon``), where numeric noise cannot
  flip the order; and the largest reference margin a disagreement crossed
  (what a profile's ``tie_epsilon`` must cover);
- Δp = p_engine - p_reference of the reference's top token: RMS and
  percentiles of its magnitude.

The tail. Engines report only their top k tokens, so KL is computed on a
coarsened distribution: the tokens both sides list, plus one bin holding the
rest of each side's mass. Merging outcomes never increases KL (the log-sum
inequality), so the figure is a *lower bound* on the full-vocabulary KL. The
gap is exactly ``p_rest * KL(reference tail || engine tail)`` (both
renormalised); no top-k list can bound it from above, because an engine may
put arbitrarily little mass on one unlisted token. A list covering all but
``RESOLUTION`` (1e-4) of the mass is taken as the whole distribution, and an
engine's rest bin smaller than that counts as 1e-4 (the most it can be, which
keeps the bound). The reference mass in the rest bin is reported (``tail
mass``) so a reader sees how much was merged; with the default k of 40 it
averages 0.11 on ``smollm2-135m`` (49,152 tokens) and 3e-7 on ``dummy``. A
reference top token the engine does not list counts as engine probability 0
in Δp: the larger of the two possible magnitudes.

Teacher forcing uses only the protocol: an engine with the ``score``
capability is asked once per text; one without it is asked one one-token
``generate`` per position (the prefix as prompt), which costs a prefill per
position but needs nothing beyond ``logprobs``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conformance.profiles import AgreementLimits
from engines.protocol import GenerateRequest, ScoreRequest

TEXTS_DIR = Path(__file__).parent / "agreement_texts"
DEFAULT_TOP = 40
# Positions measured when the user does not say: all of every text, except on models
# where a forward pass is slow; the budget is split evenly among the texts.
DEFAULT_POSITIONS = {"smollm2-135m": 512}
# A top-k list missing less than this much mass is taken as the whole distribution:
# float32 normalisation error is of that order and would otherwise show as a phantom
# rest bin (on dummy the reference's top 40 sum to 1 - 1.6e-6, transformers' to
# 1 + 1.7e-8, for the same tokens; KL of the phantom bins: 2e-5).
RESOLUTION = 1e-4


class AgreementError(Exception):
    """An engine's answer cannot be measured (missing or malformed logprobs)."""


@dataclass(frozen=True)
class Text:
    name: str
    # A plain string, or chat messages rendered with the model's chat template.
    content: str | list[dict]

    def tokens(self, tokenizer) -> list[int]:
        if isinstance(self.content, str):
            return list(tokenizer.encode(self.content))
        rendered = tokenizer.apply_chat_template(self.content, tokenize=False)
        return list(tokenizer.encode(rendered, add_special_tokens=False))


def load_texts(folder: Path = TEXTS_DIR) -> list[Text]:
    """The shipped texts, in name order: ``*.json`` are chats, anything else plain text."""
    texts = []
    for path in sorted(folder.iterdir()):
        content = path.read_text(encoding="utf-8")
        texts.append(Text(path.stem, json.loads(content) if path.suffix == ".json" else content))
    return texts


# -- one position ----------------------------------------------------------------------------

TopList = list[tuple[int, float]]


@dataclass(frozen=True)
class Position:
    text: str
    index: int  # the position in the text's token ids whose next token is predicted
    kl: float
    tail: float  # reference mass outside the tokens both sides listed
    same_top: bool
    clear: bool  # the reference's margin is at least the profile's tie epsilon
    dp: float  # engine minus reference probability of the reference's top token
    # Where the top tokens differ: the reference's logprob margin between its top token and
    # the engine's (at least the margin to its last listed token when it does not list it).
    crossed: float


def listed_probabilities(listed: TopList) -> dict[int, float]:
    """A top-k list as probabilities; one covering all but ``RESOLUTION`` of the mass is
    renormalised to be the whole distribution (see ``RESOLUTION``)."""
    probs = {t: math.exp(lp) for t, lp in listed}
    total = sum(probs.values())
    if 1.0 - total < RESOLUTION:
        probs = {t: p / total for t, p in probs.items()}
    return probs


def coarse_kl(reference: TopList, engine: TopList) -> tuple[float, float]:
    """KL(reference || engine) over the tokens both list plus one bin for the rest, and
    the reference mass in that bin. A lower bound on the full KL (see the module doc)."""
    p_all, q_all = listed_probabilities(reference), listed_probabilities(engine)
    shared = [t for t in p_all if t in q_all]
    p = np.array([p_all[t] for t in shared])
    q = np.array([q_all[t] for t in shared])
    p_rest = max(1.0 - float(p.sum()), 0.0)
    # An engine rest below the resolution counts as the resolution, the most it can be:
    # that keeps the figure a lower bound.
    q_rest = max(1.0 - float(q.sum()), RESOLUTION)
    kl = float(np.sum(p * np.log(p / q)))
    if p_rest > 0:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0), p_rest  # a rest bin floored above the engine's true one can dip below 0


def position(text: str, index: int, reference: TopList, engine: TopList,
             epsilon: float) -> Position:
    kl, tail = coarse_kl(reference, engine)
    top, top_lp = reference[0]
    margin = top_lp - reference[1][1] if len(reference) > 1 else math.inf
    q_top = math.exp(dict(engine).get(top, -math.inf))
    engine_top = engine[0][0]
    crossed = 0.0
    if engine_top != top:
        crossed = top_lp - dict(reference).get(engine_top, reference[-1][1])
    return Position(
        text=text,
        index=index,
        kl=kl,
        tail=tail,
        same_top=engine_top == top,
        clear=margin >= epsilon,
        dp=q_top - math.exp(top_lp),
        crossed=crossed,
    )


# -- summaries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    positions: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float  # fraction of positions
    clear_positions: int
    clear_top1: float  # fraction of the clear positions (1.0 when there are none)
    crossed_max: float  # the largest reference margin a top-1 disagreement crossed
    dp_rms: float
    dp_median: float  # of |dp|
    dp_p90: float
    dp_p99: float
    dp_max: float
    tail_mean: float
    tail_max: float


def summarize(positions: list[Position]) -> Summary:
    kl = np.array([p.kl for p in positions])
    dp = np.array([p.dp for p in positions])
    clear = [p for p in positions if p.clear]
    tails = np.array([p.tail for p in positions])
    return Summary(
        positions=len(positions),
        kl_mean=float(kl.mean()),
        kl_median=float(np.median(kl)),
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()),
        top1=sum(p.same_top for p in positions) / len(positions),
        clear_positions=len(clear),
        clear_top1=sum(p.same_top for p in clear) / len(clear) if clear else 1.0,
        crossed_max=max(p.crossed for p in positions),
        dp_rms=float(np.sqrt(np.mean(dp**2))),
        dp_median=float(np.median(np.abs(dp))),
        dp_p90=float(np.percentile(np.abs(dp), 90)),
        dp_p99=float(np.percentile(np.abs(dp), 99)),
        dp_max=float(np.abs(dp).max()),
        tail_mean=float(tails.mean()),
        tail_max=float(tails.max()),
    )


@dataclass(frozen=True)
class Breach:
    """One agreement limit a summary breaks."""

    metric: str  # "KL mean", "KL p99", "|dp| p99", "top-1 agreement" or "... at clear positions"
    value: float
    limit: float
    at_least: bool  # the limit is a lower bound

    def __str__(self) -> str:
        return f"{self.metric} {self.value:.4g} {'<' if self.at_least else '>'} {self.limit:.4g}"


def breaches(summary: Summary, limits: AgreementLimits) -> list[Breach]:
    """Each limit the summary breaks, in the order of the profile table (PROTOCOL.md, J6)."""
    checks = [
        Breach("KL mean", summary.kl_mean, limits.kl_mean, False),
        Breach("KL p99", summary.kl_p99, limits.kl_p99, False),
        Breach("|dp| p99", summary.dp_p99, limits.dp_p99, False),
        Breach("top-1 agreement", summary.top1, limits.top1_min, True),
        Breach(
            "top-1 agreement at clear positions",
            summary.clear_top1,
            limits.clear_top1_min,
            True,
        ),
    ]
    return [b for b in checks if ((b.value < b.limit) if b.at_least else (b.value > b.limit))]


def exceeded(summary: Summary, limits: AgreementLimits) -> list[str]:
    """Each limit the summary breaks, as a sentence naming the figure and the limit."""
    return [str(b) for b in breaches(summary, limits)]


def worst_position(positions: list[Position], metric: str) -> Position:
    """The position that does most to break ``metric`` (a ``Breach.metric``): the largest KL
    or |dp|, or for top-1 the disagreement across the largest reference margin (at a clear
    position, for the clear figure)."""
    if metric.startswith("KL"):
        return max(positions, key=lambda p: p.kl)
    if metric.startswith("|dp|"):
        return max(positions, key=lambda p: abs(p.dp))
    pool = [p for p in positions if p.clear] if "clear" in metric else positions
    return max(pool, key=lambda p: (not p.same_top, p.crossed))


@dataclass
class Agreement:
    """One engine on one model, against the reference."""

    engine: str
    model: str
    profile: str
    limits: AgreementLimits
    summary: Summary
    per_text: dict[str, Summary]
    top: int
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


# -- teacher forcing --------------------------------------------------------------------------


def teacher_force(engine, tokens: list[int], top: int) -> list[TopList]:
    """The engine's top-``top`` logprobs after each prefix ``tokens[:i]``, i = 1..n-1."""
    if "score" in engine.capabilities:
        events = engine.score(ScoreRequest(tokens[:1], tokens[1:], top))
    else:
        events = [first_step(engine, tokens[:i], top) for i in range(1, len(tokens))]
    if len(events) != len(tokens) - 1:
        raise AgreementError(f"{len(events)} events for {len(tokens) - 1} positions")
    tops = [event.top_logprobs for event in events]
    for index, listed in enumerate(tops, start=1):
        if not listed:
            raise AgreementError(f"no top logprobs at position {index}")
    return tops


def first_step(engine, prompt: list[int], top: int):
    """The one event of a one-token greedy generation after ``prompt``."""
    # Read the whole answer: an engine behind a pipe must finish it before the next request.
    events = list(engine.generate(GenerateRequest(prompt, max_tokens=1, top_logprobs=top)))
    return events[0]


def measure(reference_engine, engine, tokenizer, texts: list[Text], epsilon: float,
            top: int = DEFAULT_TOP, positions: int | None = None,
            cache: dict | None = None) -> tuple[Summary, dict[str, Summary], list[Position]]:
    """Teacher-force both engines over ``texts`` (each cut to its share of ``positions``)
    and compare them position by position. ``cache`` keeps the reference's answers for
    the next engine measured (on a slow model they cost as much as the engine's)."""
    cache = {} if cache is None else cache
    share = math.ceil(positions / len(texts)) if positions else None
    measured: list[Position] = []
    per_text: dict[str, Summary] = {}
    for text in texts:
        tokens = text.tokens(tokenizer)
        if share is not None:
            tokens = tokens[: share + 1]
        key = (tuple(tokens), top)
        if key not in cache:
            cache[key] = teacher_force(reference_engine, tokens, top)
        expected = cache[key]
        actual = teacher_force(engine, tokens, top)
        these = [
            position(text.name, i + 1, e, a, epsilon)
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
        ]
        per_text[text.name] = summarize(these)
        measured.extend(these)
    return summarize(measured), per_text, measured


def agreement(engine_label: str, model: str, profile, reference_engine, engine, tokenizer,
              texts: list[Text], top: int = DEFAULT_TOP, positions: int | None = None,
              cache: dict | None = None) -> Agreement:
    """Measure ``engine`` against ``reference_engine`` and judge it by ``profile``."""
    if positions is None:
        positions = DEFAULT_POSITIONS.get(model)
    summary, per_text, _ = measure(
        reference_engine, engine, tokenizer, texts, profile.tie_epsilon, top, positions, cache
    )
    return Agreement(
        engine=engine_label,
        model=model,
        profile=profile.name,
        limits=profile.agreement,
        summary=summary,
        per_text=per_text,
        top=top,
        problems=exceeded(summary, profile.agreement),
    )
