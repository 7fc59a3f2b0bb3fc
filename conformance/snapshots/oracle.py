"""The oracle replayed from snapshots: checks against golden answers, without the reference.

``SnapshotOracle`` answers every question a case's check asks of the oracle
(``conformance.oracle.Oracle``: tokenize, embed, answer a request, decode)
from a snapshot folder (see ``store.py``). The checks themselves run
unchanged, so an engine gets the verdicts it would get against the live
reference, as long as the snapshot was taken from the reference
(``tests/test_snapshots.py`` proves it on the dummy catalogue, for the
reference and for every mutant).

Nothing here imports MLX or the reference: this is what lets
``lmconform check --against snapshots`` run on machines without them.

Limits: a request the snapshot never saw has no answer. That happens
when a case's definition changed after the snapshot was taken (caught up
front by its definition hash, the case is then skipped with the reason), and
where a check builds requests from the engine's own outputs:

- ``prompt_cache``: the second turn continues the engine's first answer. An
  engine whose first answer differs from the reference's fails that case
  either way; the snapshot oracle says why.
- ``distribution`` cases over whole generations (speculative sampling) ask
  for the reference's logprobs at every prefix the engine's draws reach, and
  another engine's draws reach other prefixes than the reference's did.

- resumption after a near-tie (``comparator.py``, rule 5) needs the reference's
  logprobs along the engine's own tokens; a snapshot holds only the reference's
  own path, so ``continuation`` says so, the comparison stops at the near-tie
  and its verdict counts the steps left unjudged.

Snapshots mark such cases (and those needing more logprobs than a snapshot
stores) ``not_replayable``; they are skipped, and ``missing`` says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models

from conformance.catalogue import Case, CatalogueError
from conformance.comparator import ResumptionUnavailable
from conformance.oracle import REFERENCE_TOP, as_asked, as_scored, readable_token, request_key
from conformance.profiles import PrecisionProfile, profile_for_model
from conformance.snapshots.store import (
    GOLDEN_DIR,
    CaseSnapshot,
    SnapshotError,
    VocabularyData,
    case_definition,
    group_path,
    read_group,
    read_vocabulary,
    request_summary,
    snapshot_groups,
)
from engines.protocol import GenerateRequest, ScoreRequest, Trace


class SnapshotMiss(CatalogueError):
    """The snapshot holds no answer to a question the case asked."""


class SnapshotVocabulary:
    """Decoding token ids from a stored vocabulary, exactly as the reference's tokenizer does.

    The reference's tokenizers are byte-level BPE in the ``tokenizers`` library;
    decoding needs only the vocabulary, the tokens matched whole, and the
    byte-level decoder (merges only matter for encoding, which is not done here).
    """

    def __init__(self, data: VocabularyData):
        if data.decoder != "byte_level":
            raise SnapshotError(f"{data.model}: unknown decoder {data.decoder!r}")
        self.data = data
        backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(data.tokens)}, merges=[]))
        backend.decoder = decoders.ByteLevel()
        added = [(i, special) for i, special in sorted(data.added.items())]
        backend.add_special_tokens(
            [AddedToken(data.tokens[i], special=True, normalized=False) for i, s in added if s]
        )
        backend.add_tokens(
            [AddedToken(data.tokens[i], special=False, normalized=False) for i, s in added if not s]
        )
        self._backend = backend

    def decode(self, tokens: list[int]) -> str:
        return self._backend.decode([int(t) for t in tokens], skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        """A token as a human should see it (``conformance.oracle.readable_token``)."""
        piece = self.data.tokens[token] if 0 <= token < len(self.data.tokens) else f"<{token}>"
        return readable_token(self.decode([token]), piece)


class SnapshotOracle:
    """The oracle of one model (``conformance.oracle.Oracle``), answering from the snapshot
    files in ``folder``."""

    engine = None  # no live engine behind it: every engine under test is opened separately

    def __init__(self, model: str, folder: str | Path = GOLDEN_DIR):
        self.model = model
        self.folder = Path(folder)
        groups = snapshot_groups(self.folder, model)
        if not groups:
            raise SnapshotError(f"no snapshots of {model} in {self.folder / model}")
        vocabulary = read_vocabulary(self.folder, model)
        self.vocabulary = SnapshotVocabulary(vocabulary)
        self.vocab_size = vocabulary.vocab_size
        self.end_tokens = set(vocabulary.end_tokens)
        self.engine_description = ""
        self.cases: dict[str, CaseSnapshot] = {}
        self._encode: dict[str, list[int]] = {}
        self._encode_chat: dict[str, list[int]] = {}
        self._embed: dict[tuple[int, ...], list[list[float]]] = {}
        self._answers: dict[str, Trace] = {}
        self._source: dict[object, str] = {}  # what came from which file (for conflicts)
        for group in groups:
            snapshot = read_group(self.folder, model, group)
            self.engine_description = snapshot.engine
            where = str(group_path(self.folder, model, group))
            for case in snapshot.cases.values():
                self._check_vocabulary(case, where)
                self._add(case, where)

    def _check_vocabulary(self, case: CaseSnapshot, where: str) -> None:
        """Every token id in a snapshot is below the vocabulary size (else: the file is bad)."""
        ids = [t for table in (case.inputs.encode, case.inputs.encode_chat) for v in
               table.values() for t in v]
        ids += [t for e in case.inputs.embed for t in e.tokens]
        for answer in case.answers:
            for event in answer.trace.events:
                ids += [event.token, *(t for t, _ in event.top_logprobs or [])]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise SnapshotError(
                f"{where}: case {case.case_id}: token id {bad[0]} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    def _add(self, case: CaseSnapshot, where: str = "") -> None:
        """Take in one case; a question answered differently by two copies is an error."""
        self._keep(self.cases, ("case", case.case_id), case.case_id, case, where, same=False)
        for name, table in (("encode", self._encode), ("encode_chat", self._encode_chat)):
            for text, ids in getattr(case.inputs, name).items():
                self._keep(table, (name, text), text, ids, where)
        for embedding in case.inputs.embed:
            key = tuple(embedding.tokens)
            self._keep(self._embed, ("embed", key), key, embedding.vectors, where)
        for answer in case.answers:
            self._keep(self._answers, ("answer", answer.key), answer.key, answer.trace, where)

    def _keep(self, table: dict, what, key, value, where: str, same: bool = True) -> None:
        """``table[key] = value``, unless a copy from elsewhere differs (``same``: equal
        copies are fine, as two cases may ask the same question; else any copy conflicts)."""
        if key in table and (not same or table[key] != value):
            raise SnapshotError(
                f"conflicting snapshots: {what[0]} {_short(what[1])} in {where} differs from "
                f"the copy in {self._source[what]}"
                if same
                else f"conflicting snapshots: case {key} is both in {self._source[what]} "
                f"and in {where}"
            )
        table[key] = value
        self._source.setdefault(what, where)

    def default_profile(self, override: str | None = None) -> PrecisionProfile:
        return profile_for_model(self.model, override)

    def missing(self, case: Case) -> str | None:
        """Why ``case`` cannot be checked against these snapshots, or None if it can."""
        stored = self.cases.get(case.id)
        if stored is None:
            return f"no snapshot of case {case.id} for {self.model} in {self.folder}"
        if stored.not_replayable:
            return f"{case.id}: {stored.not_replayable}"
        if stored.definition != case_definition(case):
            return (
                f"the snapshot of {case.id} is out of date: the case changed in cases.toml "
                "since it was taken (regenerate the snapshots)"
            )
        return None

    # -- the questions checks ask -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self._lookup(self._encode, text, f"the token ids of {text!r}"))

    def encode_chat(self, text: str) -> list[int]:
        return list(self._lookup(self._encode_chat, text, f"the chat prompt {text!r}"))

    def embed(self, tokens: list[int]) -> np.ndarray:
        vectors = self._lookup(self._embed, tuple(tokens), f"embeddings of tokens {tokens}")
        return np.array(vectors, dtype=np.float32)

    def greedy_tokens(self, request: GenerateRequest) -> list[int]:
        return self.answer(request).tokens

    def answer(self, request: GenerateRequest, top: int = REFERENCE_TOP) -> Trace:
        asked = as_asked(request, top)
        return self._lookup(self._answers, request_key(asked), _describe(asked))

    def answer_score(self, request: ScoreRequest) -> Trace:
        asked = as_scored(request)
        return self._lookup(self._answers, request_key(asked), _describe(asked))

    def continuation(self, request: GenerateRequest, tokens: list[int]) -> Trace:
        """The reference along the engine's tokens: only where they are the stored path."""
        stored = self.answer(request)
        if stored.tokens == list(tokens):
            return stored
        raise ResumptionUnavailable(
            "snapshots hold the reference's own path only and cannot score the engine's "
            "continuation; check against the live reference to judge it"
        )

    def decode(self, tokens: list[int]) -> str:
        return self.vocabulary.decode(tokens)

    def token_text(self, token: int) -> str:
        return self.vocabulary.token_text(token)

    def close(self) -> None:
        pass

    def _lookup(self, table: dict, key, what: str):
        try:
            return table[key]
        except KeyError:
            raise SnapshotMiss(
                f"the snapshot in {self.folder} holds no {what}; either the case depends on "
                "an earlier answer of the engine that differs from the snapshot's, or the "
                "snapshot is out of date"
            ) from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _describe(request: GenerateRequest | ScoreRequest) -> str:
    text = str(request_summary(request))
    return "answer to " + (text if len(text) <= 200 else text[:200] + "...")
