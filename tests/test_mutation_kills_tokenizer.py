"""reference/tokenizer.py pinned down: what the streaming detokenizer holds back and when
it lets go, its refusal of a decoder that rewrites earlier text, and the wrapper's EOS ids
and delegation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from reference.dummy import dummy_hf_tokenizer
from reference.tokenizer import StreamingDetokenizer, TokenizerWrapper


@pytest.fixture(scope="module")
def hf():
    return dummy_hf_tokenizer()


def pieces(detokenizer: StreamingDetokenizer, tokens: list[int]) -> list[str]:
    out = []
    for token in tokens:
        detokenizer.add_token(token)
        out.append(detokenizer.last_segment)
    detokenizer.finalize()
    out.append(detokenizer.last_segment)
    return out


def test_a_trailing_space_is_held_until_the_next_token_or_the_end(hf):
    detokenizer = StreamingDetokenizer(hf)
    assert pieces(detokenizer, hf.encode("a b")) == ["a", "", " b", ""]
    assert detokenizer.text == "a b"
    detokenizer.reset()
    assert (detokenizer.tokens, detokenizer.text, detokenizer.last_segment) == ([], "", "")
    assert pieces(detokenizer, hf.encode("a ")) == ["a", "", " "]


def test_the_last_segment_is_given_once(hf):
    detokenizer = StreamingDetokenizer(hf)
    for token in hf.encode("ab"):
        detokenizer.add_token(np.int64(token))  # token ids of any integer type
    assert detokenizer.tokens == [97, 98] and all(type(t) is int for t in detokenizer.tokens)
    assert detokenizer.last_segment == "ab"
    assert detokenizer.last_segment == ""
    # Text not yet taken is kept through finalize, with what finalize adds.
    detokenizer.add_token(ord("c"))
    detokenizer.add_token(ord(" "))
    detokenizer.finalize()
    assert detokenizer.last_segment == "c "


class Rewriting:
    """A decoder that is not prefix-stable: once "ab" is complete it becomes "X" (real
    byte-level decoders can do the like when they clean up spaces)."""

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens).replace("ab", "X")


def test_text_that_rewrites_what_was_emitted_is_never_emitted_and_finalize_says_so():
    detokenizer = StreamingDetokenizer(Rewriting())
    for token in map(ord, "abc"):
        detokenizer.add_token(token)
    assert detokenizer.last_segment == "a"  # "Xc" does not continue "a": nothing more
    with pytest.raises(RuntimeError) as raised:
        detokenizer.finalize()
    assert str(raised.value) == (
        "tokenizer.decode is not prefix-stable for this sequence; "
        "emitted 'a' but the full text is 'Xc'"
    )


def test_eos_ids_default_to_the_tokenizers_own_or_none(hf):
    assert TokenizerWrapper(hf).eos_token_ids == {hf.eos_token_id}
    assert TokenizerWrapper(dummy_hf_tokenizer(eos_token=None)).eos_token_ids == set()
    given = TokenizerWrapper(hf, eos_token_ids=[np.int64(3), 4])
    assert given.eos_token_ids == {3, 4} and all(type(t) is int for t in given.eos_token_ids)
    given.eos_token_ids = [np.int64(7)]
    assert given.eos_token_ids == {7} and all(type(t) is int for t in given.eos_token_ids)


def test_an_eos_token_is_added_by_name_or_id_and_an_unknown_one_refused(hf):
    wrapper = TokenizerWrapper(hf, eos_token_ids=[])
    wrapper.add_eos_token("a")
    wrapper.add_eos_token(5)
    wrapper.add_eos_token(0)  # id 0 is a token like any other
    assert wrapper.eos_token_ids == {97, 5, 0}
    for bad in ("zzz", -1):
        with pytest.raises(ValueError) as raised:
            wrapper.add_eos_token(bad)
        assert str(raised.value) == f"'{bad}' is not a token of this vocabulary"
    assert wrapper.eos_token_ids == {97, 5, 0}


def test_the_chat_template_gives_a_plain_list_of_ids(hf):
    wrapper = TokenizerWrapper(hf)
    chat = [{"role": "user", "content": "hi"}]
    ids = wrapper.apply_chat_template(chat, add_generation_prompt=True)
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    text = wrapper.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert hf.encode(text, add_special_tokens=False) == ids


def test_everything_else_is_the_wrapped_tokenizers(hf):
    wrapper = TokenizerWrapper(hf)
    assert wrapper.tokenizer is hf and len(wrapper) == len(hf)
    assert wrapper.convert_tokens_to_ids("a") == 97
    detokenizer = wrapper.detokenizer
    assert isinstance(detokenizer, StreamingDetokenizer) and detokenizer.text == ""
    assert pieces(detokenizer, hf.encode("é")) == ["", "é", ""]
    # A dunder is never delegated, even one the wrapped tokenizer has.
    assert callable(hf.__call__)
    with pytest.raises(AttributeError) as raised:
        wrapper.__call__  # noqa: B018
    assert raised.value.args == ("__call__",)
    # A wrapper not yet initialised (as copy and pickle make them) must not recurse.
    with pytest.raises(AttributeError):
        TokenizerWrapper.__new__(TokenizerWrapper).eos_token_id  # noqa: B018
    assert copy.deepcopy(wrapper).eos_token_ids == wrapper.eos_token_ids
