"""The ``openai:`` spec grammar and the mapping of servers' token names back to ids."""

from __future__ import annotations

import pytest

from engines.adapters.openai import Vocabulary
from engines.registry import EngineUnavailable, parse_spec
from reference.server import token_bytes, token_name


def test_openai_spec_keeps_the_urls_colons_and_takes_trailing_options():
    spec = parse_spec("openai:http://127.0.0.1:8080/v1:model=m:api_key_env=KEY,chat=1")
    assert (spec.kind, spec.target) == ("openai", "http://127.0.0.1:8080/v1")
    assert spec.options == {"model": "m", "api_key_env": "KEY", "chat": "1"}
    # A query string is part of the URL: "8080/v1?x=y" does not start with "key=".
    assert parse_spec("openai:http://h:8080/v1?x=y").target == "http://h:8080/v1?x=y"
    assert parse_spec("openai:http://h:8080/v1").options == {}


def test_openai_spec_without_a_url_is_refused():
    with pytest.raises(EngineUnavailable, match="needs the server's URL"):
        parse_spec("openai:localhost:8080")


def test_every_way_a_server_names_a_token_maps_back_to_its_id(dummy):
    """Names written by lmconform serve (text, ``bytes:\\xNN``, byte lists, ``token_id:N``)
    and the vocabulary's own pieces all map back to the id they name."""
    _, wrapper = dummy
    tokenizer = wrapper.tokenizer
    vocabulary = Vocabulary(tokenizer, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for token, piece in enumerate(pieces):
        raw = list(token_bytes(tokenizer, token))
        assert vocabulary.token_id({"id": token}) == token
        assert vocabulary.token_id({"token": token_name(tokenizer, token, as_id=True)}) == token
        assert vocabulary.token_id({"token": token_name(tokenizer, token, as_id=False)}) == token
        assert vocabulary.token_id({"token": "?", "bytes": raw}) == token
        assert vocabulary.token_id({"token": piece}) == token
    # Byte 0xb8 alone is no UTF-8 character: named by its bytes, and mapped back exactly.
    assert token_name(tokenizer, 0xB8, as_id=False) == "bytes:\\xb8"


def test_unknown_or_out_of_range_tokens_are_protocol_errors(dummy):
    from engines.protocol import ProtocolError

    tokenizer = dummy[1].tokenizer
    vocabulary = Vocabulary(tokenizer, len(tokenizer))
    with pytest.raises(ProtocolError, match="outside the vocabulary"):
        vocabulary.token_id({"token": f"token_id:{len(tokenizer)}"})
    with pytest.raises(ProtocolError, match="not in the model's vocabulary"):
        vocabulary.token_id({"token": "a whole sentence is no token"})
