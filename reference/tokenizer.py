"""Tokenizer wrapper and the streaming detokenizer.

``TokenizerWrapper`` wraps a Hugging Face tokenizer (any object with
``encode``/``decode``) and adds what generation needs: the set of EOS ids and
a fresh streaming detokenizer per generation. Everything else is delegated, so
``apply_chat_template`` and friends behave exactly as in transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    """Turns a stream of tokens into text pieces.

    Two guarantees: a piece never ends inside a UTF-8 character (bytes of a
    character split over several tokens are held back until complete), and the
    pieces joined equal ``tokenizer.decode(all_tokens)`` exactly.

    The method is the obvious one: decode everything so far and emit the part
    that is stable. Text that can still change is held back: a trailing
    replacement character (an incomplete UTF-8 sequence) and a trailing space
    (tokenizers that clean up spaces may drop it once the next token is known).
    Decoding the whole sequence each time is quadratic, and fine for the
    lengths a reference engine is asked to produce.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.emitted = ""
        self._pending = ""

    def add_token(self, token: int) -> None:
        self.tokens.append(int(token))
        text = self._tokenizer.decode(self.tokens)
        stable = text.rstrip(REPLACEMENT_CHAR)
        stable = stable.removesuffix(" ")
        if stable.startswith(self.emitted) and len(stable) > len(self.emitted):
            self._pending += stable[len(self.emitted) :]
            self.emitted = stable

    def finalize(self) -> None:
        text = self._tokenizer.decode(self.tokens)
        if not text.startswith(self.emitted):
            raise RuntimeError(
                "tokenizer.decode is not prefix-stable for this sequence; "
                f"emitted {self.emitted!r} but the full text is {text!r}"
            )
        self._pending += text[len(self.emitted) :]
        self.emitted = text

    @property
    def text(self) -> str:
        return self.emitted

    @property
    def last_segment(self) -> str:
        """The text produced since the previous call."""
        segment, self._pending = self._pending, ""
        return segment


class TokenizerWrapper:
    """A Hugging Face tokenizer plus ``eos_token_ids`` and ``detokenizer``."""

    def __init__(self, tokenizer, eos_token_ids: Iterable[int] | None = None):
        self._tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self._eos_token_ids = {int(t) for t in eos_token_ids}

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: Iterable[int]) -> None:
        self._eos_token_ids = {int(t) for t in ids}

    def add_eos_token(self, token: str | int) -> None:
        token_id = token if isinstance(token, int) else self._tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id < 0:
            raise ValueError(f"'{token}' is not a token of this vocabulary")
        self._eos_token_ids.add(int(token_id))

    def apply_chat_template(self, *args, tokenize: bool = True, **kwargs):
        """As in transformers, but token ids come back as a plain list (as in mlx-lm)."""
        kwargs.setdefault("return_dict", False)
        return self._tokenizer.apply_chat_template(*args, tokenize=tokenize, **kwargs)

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A new streaming detokenizer (each generation needs its own)."""
        return StreamingDetokenizer(self._tokenizer)

    @property
    def tokenizer(self):
        """The wrapped Hugging Face tokenizer."""
        return self._tokenizer

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_tokenizer":
            raise AttributeError(name)
        return getattr(self._tokenizer, name)
