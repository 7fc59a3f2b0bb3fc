"""The streaming detokenizer: pieces never split a UTF-8 character and join to decode()."""

from __future__ import annotations

import pytest

from reference.tokenizer import REPLACEMENT_CHAR, StreamingDetokenizer

TEXTS = [
    "A café in Paris",
    "日本語のテキスト 🙂 and emoji 👩‍👩‍👧",
    "Spaces  ,  and punctuation . ! ?",
    "line one\nline two\n\n  indented",
]


@pytest.fixture(
    scope="module", params=["dummy", pytest.param("smollm2-135m", marks=pytest.mark.smollm)]
)
def tokenizer(request, loaded_models):
    return loaded_models(request.param)[1]


def stream(tokenizer, tokens):
    detokenizer = tokenizer.detokenizer
    pieces = []
    for token in tokens:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_decode_and_never_split_a_character(tokenizer, text):
    tokens = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, tokens)
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_multibyte_character_is_held_until_complete(loaded_models):
    tokenizer = loaded_models("dummy")[1]
    tokens = tokenizer.encode("é", add_special_tokens=False)
    assert len(tokens) == 2  # one token per UTF-8 byte in the dummy vocabulary
    assert stream(tokenizer, tokens) == ["", "é", ""]


def test_invalid_bytes_still_join_to_decode(loaded_models):
    """A lone continuation byte never completes: it comes out at finalize, as decode() shows it."""
    tokenizer = loaded_models("dummy")[1]
    tokens = (
        tokenizer.encode("ab", add_special_tokens=False)
        + [0x80]
        + tokenizer.encode("c", add_special_tokens=False)
    )
    pieces = stream(tokenizer, tokens)
    assert "".join(pieces) == tokenizer.decode(tokens)


def test_each_generation_gets_a_fresh_detokenizer(loaded_models):
    tokenizer = loaded_models("dummy")[1]
    first, second = tokenizer.detokenizer, tokenizer.detokenizer
    assert isinstance(first, StreamingDetokenizer) and first is not second
