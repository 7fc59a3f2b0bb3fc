"""Protocol messages: JSON round-trips, precise errors on malformed input, capabilities."""

from __future__ import annotations

import json
import math

import pytest

from engines.jsonl_protocol import decode, encode
from engines.protocol import (
    CAPABILITIES,
    BatchRequest,
    BatchRow,
    DraftSettings,
    GenerateRequest,
    ProcessorSettings,
    ProtocolError,
    SamplerSettings,
    ScoreRequest,
    TokenEvent,
    Trace,
)
from engines.serialization import dumps, loads


def full_request() -> GenerateRequest:
    return GenerateRequest(
        prompt=[1, 2, 3],
        prompt_embeddings=[[0.5, -1.25], [float("-inf"), 2.0]],
        max_tokens=7,
        sampler=SamplerSettings(temp=0.7, top_p=0.9, min_p=0.05, top_k=40, seed=11),
        processors=ProcessorSettings(logit_bias={65: -2.5, 7: 1.0}, repetition_penalty=1.3),
        stop_tokens=[9],
        stop_sequences=[[4, 5]],
        draft=DraftSettings("dummy-draft", 3),
        prefill_step_size=4,
        max_kv_size=32,
        top_logprobs=5,
        stream=False,
        cache_key="chat-1",
    )


def test_every_message_type_survives_a_json_round_trip():
    request = full_request()
    messages = [
        request,
        BatchRequest([BatchRow(request, insert_at=3), BatchRow(GenerateRequest(prompt=[5]))]),
        ScoreRequest(prompt=[1], continuation=[2, 3], top_logprobs=2),
        TokenEvent(7, -0.25, [(7, -0.25), (3, -1.5)], "a", True, "stop"),
        Trace([TokenEvent(1, float("-inf")), TokenEvent(2, -1.0, finish_reason="length")]),
    ]
    for message in messages:
        back = decode(encode(message)).body
        assert type(back) is type(message)
        assert dumps(back) == dumps(message)


def test_json_forms_of_keys_and_infinities():
    line = dumps(full_request())
    data = json.loads(line)  # strict JSON: no Infinity literals
    assert data["processors"]["logit_bias"] == {"65": -2.5, "7": 1.0}
    assert data["prompt_embeddings"][1][0] == "-inf"
    back = loads(GenerateRequest, line)
    assert back.processors.logit_bias == {65: -2.5, 7: 1.0}
    assert math.isinf(back.prompt_embeddings[1][0]) and back.prompt_embeddings[1][0] < 0
    assert back.draft == DraftSettings("dummy-draft", 3)


@pytest.mark.parametrize(
    "message, complaint",
    [
        ({"type": "generate", "max_tokens": "7"}, "generate.max_tokens: expected an integer"),
        ({"type": "generate", "max_token": 7}, "unknown field(s) ['max_token']"),
        ({"type": "generate", "stream": 1}, "generate.stream: expected true or false"),
        (
            {"type": "batch", "rows": [{"request": {"prompt": ["a"]}}]},
            "batch.rows[0].request.prompt[0]",
        ),
        ({"type": "batch", "rows": [{"insert_at": 1}]}, "missing required field 'request'"),
        (
            {"type": "generate", "processors": {"logit_bias": {"x": 1.0}}},
            "key 'x' is not an integer",
        ),
        ({"type": "event", "token": 1, "top_logprobs": [[1]]}, "expected a 2-list"),
        ({"type": "teleport"}, "unknown message type 'teleport'"),
        (["generate"], "must be a JSON object"),
    ],
)
def test_malformed_messages_are_rejected_with_the_offending_path(message, complaint):
    with pytest.raises(ProtocolError) as error:
        decode(json.dumps(message))
    assert complaint in str(error.value)


def test_malformed_json_text_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="malformed JSON"):
        loads(GenerateRequest, '{"prompt": [1, 2')


def test_capabilities_needed_follow_the_request_fields():
    assert GenerateRequest(prompt=[1]).capabilities_needed() == {"greedy"}
    needed = full_request().capabilities_needed()
    assert needed == {
        "sampling",
        "logit_bias",
        "speculative",
        "input_embeddings",
        "prefill_chunking",
        "rotating_kv",
        "prompt_cache",
    }
    assert needed <= set(CAPABILITIES)
    batch = BatchRequest([BatchRow(GenerateRequest(prompt=[1], max_kv_size=8))])
    assert batch.capabilities_needed() == {"batch", "greedy", "rotating_kv"}
    assert ScoreRequest([1], [2]).capabilities_needed() == {"score"}
    # A zero penalty is no processor at all.
    assert not ProcessorSettings(repetition_penalty=0).active
    assert ProcessorSettings(frequency_penalty=0.1).active


def test_trace_accessors():
    trace = Trace([TokenEvent(1, text="a"), TokenEvent(2, text="b", finish_reason="stop")])
    assert (trace.tokens, trace.text, trace.finish_reason, len(trace)) == ([1, 2], "ab", "stop", 2)
    assert Trace().finish_reason is None
