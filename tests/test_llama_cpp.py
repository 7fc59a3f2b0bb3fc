"""llama.cpp (through llama-cpp-python) as a peer engine, on smollm2-135m's own GGUF file.

Two models are used. The Q4_1 file itself, as the suite hands it to llama.cpp: there
llama.cpp multiplies 4-bit weights with activations it quantizes to 8 bits (Q8_1), so
its logprobs differ from the reference's by up to about 0.3 nats. And the same weights
dequantized to a float32 GGUF: there llama.cpp computes in float32 like the reference,
so its answers must equal the reference's within 0.01 nats; that is what proves the
adapter (positions, logits, bias, penalties, scoring) right.

Requests are few and short (the reference decodes about 6 tokens/s on these CPUs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conformance.comparator import compare_traces
from conformance.runner import NEAR_TIE
from engines import registry
from engines.models import ModelSource, gguf_file
from engines.protocol import (
    DraftSettings,
    GenerateRequest,
    ProcessorSettings,
    SamplerSettings,
    ScoreRequest,
    Trace,
    Unsupported,
)
from engines.registry import EngineUnavailable, installed_peers, open_engine

MODEL = "smollm2-135m"
FRANCE = "What is the capital of France?"


def test_without_llama_cpp_python_the_engine_is_unavailable_with_its_install_command(
    monkeypatch,
):
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util,
        "find_spec",
        lambda name: None if name == "llama_cpp" else real(name),
    )
    with pytest.raises(EngineUnavailable) as error:
        open_engine("llama-cpp", MODEL)
    assert "missing: llama_cpp" in str(error.value)
    assert "pip install 'lmconform[llama-cpp]'" in str(error.value)
    assert "llama-cpp" not in installed_peers()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="peer llama-cpp not installed: pip install 'lmconform[llama-cpp]'"
    )


@pytest.fixture(scope="module")
def engine(llama_cpp):
    engine = open_engine("llama-cpp", MODEL)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def float_engine(llama_cpp, tmp_path_factory):
    """llama.cpp on smollm2's weights dequantized to float32 (a 540 MB GGUF, removed after)."""
    from engines.adapters.llama_cpp import LlamaCppEngine

    path = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    write_float32_gguf(gguf_file(MODEL), path)
    engine = LlamaCppEngine(ModelSource(MODEL, "gguf", path))
    yield engine
    engine.close()
    path.unlink()


@pytest.fixture(scope="module")
def oracle():
    from conformance.oracle import ReferenceOracle

    oracle = ReferenceOracle(MODEL)
    yield oracle
    oracle.close()


def write_float32_gguf(source, target) -> None:
    """Copy a GGUF file with every tensor dequantized to float32 (the same values)."""
    gguf = pytest.importorskip("gguf", reason="writing GGUF files needs: pip install gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(target), architecture)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if f.name == gguf.Keys.General.FILE_TYPE:
            writer.add_key_value(f.name, 0, gguf.GGUFValueType.UINT32)  # all float32
            continue
        kind = f.types[0]
        writer.add_key_value(
            f.name,
            f.contents(),
            kind,
            sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None,
        )
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(d) for d in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def answer(engine, request: GenerateRequest) -> Trace:
    return Trace(list(engine.generate(request)))


def story_prompt(engine) -> list[int]:
    """ "Once upon a time, there was a", tokenized by llama.cpp itself."""
    return engine.llm.tokenize(b"Once upon a time, there was a", add_bos=False)


def largest_logprob_error(expected: Trace, actual: Trace) -> float:
    """The largest |difference| of chosen-token logprobs over the tokens both chose alike."""
    errors = [
        abs(e.logprob - a.logprob)
        for e, a in zip(expected.events, actual.events, strict=False)
        if e.token == a.token and math.isfinite(e.logprob)
    ]
    return max(errors)


# -- what it is -------------------------------------------------------------------------


@pytest.mark.peer
def test_it_is_a_default_peer_that_loads_only_gguf(llama_cpp):
    assert "llama-cpp" in installed_peers()
    with pytest.raises(EngineUnavailable, match="cannot load dummy: .*accepts only gguf"):
        open_engine("llama-cpp", "dummy")


@pytest.mark.peer
@pytest.mark.smollm
def test_it_loads_the_references_own_gguf_file_and_stops_where_the_reference_does(engine, oracle):
    assert engine.source.path == gguf_file(MODEL)
    assert engine.vocab_size == oracle.vocab_size == 49152
    # llama.cpp's end-of-generation set: <|im_end|> (the reference's) and two more.
    assert oracle.end_tokens == {2} and engine.end_ids == {0, 2, 4}


@pytest.mark.peer
@pytest.mark.smollm
def test_requests_llama_cpp_cannot_express_are_unsupported(engine):
    prompt = [1, 2, 3]
    refused = [
        GenerateRequest(prompt=prompt, draft=DraftSettings("self")),
        GenerateRequest(prompt=prompt, prompt_embeddings=[[0.0] * 576] * 3, cache_key="k"),
        GenerateRequest(prompt=prompt, max_kv_size=8),
        GenerateRequest(prompt=prompt, max_tokens=engine.llm.n_ctx()),  # one position too many
        GenerateRequest(
            prompt=prompt,
            processors=ProcessorSettings(
                repetition_penalty=1.2, presence_penalty=0.5, presence_context_size=64
            ),
        ),
    ]
    for request in refused:
        with pytest.raises(Unsupported):
            answer(engine, request)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        answer(engine, GenerateRequest(prompt=[49152]))


# -- on float32 weights llama.cpp computes what the reference computes ------------------


@pytest.mark.peer
@pytest.mark.smollm
def test_on_float32_weights_it_answers_the_france_prompt_as_the_reference(float_engine, oracle):
    request = GenerateRequest(prompt=oracle.encode_chat(FRANCE), max_tokens=12, top_logprobs=5)
    expected, actual = oracle.answer(request), answer(float_engine, request)
    assert oracle.decode(actual.tokens) == "The capital of France is Paris.<|im_end|>"
    assert actual.tokens == expected.tokens and actual.finish_reason == "stop"
    assert actual.text == "The capital of France is Paris."  # the end token shows no text
    assert largest_logprob_error(expected, actual) < 0.01  # measured 0.0016


@pytest.mark.peer
@pytest.mark.smollm
def test_on_float32_weights_bias_and_penalties_are_the_protocols(float_engine, oracle):
    """Logprobs after the bias, and a penalty window that starts in the prompt: either
    done otherwise moves these logprobs by nats, not by hundredths."""
    biased = GenerateRequest(
        prompt=oracle.encode_chat(FRANCE),
        max_tokens=10,
        processors=ProcessorSettings(
            logit_bias={oracle.encode(" Paris")[0]: -100.0, oracle.encode("The")[0]: 3.0}
        ),
    )
    penalised = GenerateRequest(
        prompt=oracle.encode("1, 2, 3, 4,"),
        max_tokens=7,
        processors=ProcessorSettings(repetition_penalty=1.3),
    )
    for request in (biased, penalised):
        expected, actual = oracle.answer(request), answer(float_engine, request)
        assert actual.tokens == expected.tokens
        assert largest_logprob_error(expected, actual) < 0.01  # measured 0.002


@pytest.mark.peer
@pytest.mark.smollm
def test_on_float32_weights_scores_are_the_references(float_engine, oracle):
    request = ScoreRequest(
        oracle.encode("The capital of France is"),
        oracle.encode(" Paris, a city of light and art."),
        top_logprobs=3,
    )
    expected, actual = oracle.answer_score(request), Trace(float_engine.score(request))
    assert actual.tokens == list(request.continuation)
    assert largest_logprob_error(expected, actual) < 0.02  # measured 0.0073


# -- on the Q4_1 file itself: 8-bit activations -----------------------------------------


@pytest.mark.peer
@pytest.mark.smollm
def test_on_q4_1_it_takes_the_near_tie_l_on_the_france_prompt(engine, oracle):
    request = GenerateRequest(prompt=oracle.encode_chat(FRANCE), max_tokens=12, top_logprobs=20)
    expected, actual = oracle.answer(request), answer(engine, request)
    assert oracle.decode(actual.tokens[:1]) == "L" and oracle.decode(expected.tokens[:1]) == "The"
    comparison = compare_traces(
        expected,
        actual,
        oracle.default_profile(),
        oracle.decode,
        resume=lambda tokens: oracle.continuation(request, tokens),
    )
    # The divergence itself is a near-tie (the reference's margin is 0.083 nats), not a fail.
    assert comparison.near_tie_steps == [0]
    assert comparison.verdict == NEAR_TIE or comparison.diagnostic.kind == "logprob"


@pytest.mark.peer
@pytest.mark.smollm
def test_on_q4_1_logprobs_differ_by_at_most_a_fifth_of_a_nat(engine, oracle):
    request = ScoreRequest(
        oracle.encode("The capital of France is"), oracle.encode(" Paris, a city of light and art.")
    )
    error = largest_logprob_error(oracle.answer_score(request), Trace(engine.score(request)))
    assert 0.05 < error < 0.2  # measured 0.157: far above float32's 0.007, below 0.2


# -- llama.cpp's own machinery ------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.smollm
def test_events_come_as_tokens_are_chosen_on_llama_cpps_kv_cache(engine):
    prompt = story_prompt(engine)
    events = engine.generate(GenerateRequest(prompt=prompt, max_tokens=4))
    next(events)
    assert engine.llm.n_tokens == len(prompt)  # nothing evaluated past the prompt yet
    next(events)
    assert engine.llm.n_tokens == len(prompt) + 1  # the first token, fed for the second
    events.close()


@pytest.mark.peer
@pytest.mark.smollm
def test_a_cached_prefix_and_prefill_chunks_change_what_is_evaluated_not_the_answer(
    engine, monkeypatch
):
    prompt = story_prompt(engine)
    fed: list[int] = []
    real_eval = engine.llm.eval
    monkeypatch.setattr(
        engine.llm, "eval", lambda tokens: (fed.append(len(tokens)), real_eval(tokens))
    )

    first = answer(engine, GenerateRequest(prompt=prompt, max_tokens=4, cache_key="k"))
    follow = prompt + first.tokens + [30]
    fed.clear()
    cached = answer(engine, GenerateRequest(prompt=follow, max_tokens=3, cache_key="k"))
    assert fed == [2, 1, 1]  # the last generated token and the new one; then decoding
    fed.clear()
    fresh = answer(engine, GenerateRequest(prompt=follow, max_tokens=3))
    assert fed == [len(follow), 1, 1]
    fed.clear()
    chunked = answer(engine, GenerateRequest(prompt=follow, max_tokens=3, prefill_step_size=5))
    assert fed == [5, 5, 3, 1, 1]
    for other in (cached, chunked):
        assert other.tokens == fresh.tokens
        assert [e.logprob for e in other.events] == [e.logprob for e in fresh.events]


@pytest.mark.peer
@pytest.mark.smollm
def test_its_own_embedding_rows_give_exactly_the_token_prompts_answer(engine):
    """The rows of the GGUF's token_embd, fed as a batch of vectors, whole or in chunks.
    (The reference loads these rows exactly as stored, so the rows that
    embeddings/smollm2_from_tokens sends are these very values; when they were 2.4e-4
    off, llama.cpp's 8-bit activations turned that into up to 0.21 nats.)"""
    gguf = pytest.importorskip("gguf", reason="reading GGUF files needs: pip install gguf")
    from gguf.quants import dequantize

    table = next(
        t for t in gguf.GGUFReader(gguf_file(MODEL)).tensors if t.name == "token_embd.weight"
    )
    rows = dequantize(table.data, table.tensor_type).reshape(engine.vocab_size, -1)
    prompt = story_prompt(engine)
    expected = answer(engine, GenerateRequest(prompt=prompt, max_tokens=6))
    for step in (None, 3):
        request = GenerateRequest(
            prompt_embeddings=rows[prompt].tolist(), max_tokens=6, prefill_step_size=step
        )
        actual = answer(engine, request)
        assert actual.tokens == expected.tokens and actual.text == expected.text
        assert [e.logprob for e in actual.events] == [e.logprob for e in expected.events]


@pytest.mark.peer
@pytest.mark.smollm
def test_stop_tokens_and_sequences(engine):
    prompt = story_prompt(engine)
    path = answer(engine, GenerateRequest(prompt=prompt, max_tokens=6))
    assert len(path) == 6 and path.finish_reason == "length"

    stopped = answer(
        engine, GenerateRequest(prompt=prompt, max_tokens=6, stop_tokens=[path.tokens[2]])
    )
    assert stopped.tokens == path.tokens[:3] and stopped.finish_reason == "stop"
    assert stopped.events[-1].text == ""  # a stop token shows no text

    sequence = answer(
        engine, GenerateRequest(prompt=prompt, max_tokens=6, stop_sequences=[path.tokens[1:3]])
    )
    assert sequence.tokens == path.tokens[:3] and sequence.finish_reason == "stop"
    assert sequence.text == engine.llm.detokenize(path.tokens[:3]).decode()


@pytest.mark.peer
@pytest.mark.smollm
def test_seeded_sampling_repeats_and_other_seeds_differ(engine):
    def sample(seed: int) -> list[int]:
        request = GenerateRequest(
            prompt=story_prompt(engine),
            max_tokens=12,
            sampler=SamplerSettings(temp=1.0, seed=seed),
        )
        return answer(engine, request).tokens

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


@pytest.mark.peer
def test_the_sampling_chain_is_llama_cpps_top_k_first_then_top_p_renormalised(llama_cpp):
    """Not the protocol's order: with top_k 3 and top_p 0.5 on (0.3, 0.2, 0.1, ...) the
    protocol keeps tokens 0 and 1; llama.cpp's top-p sees the top-3 renormalised
    (0.5, 0.33, 0.17) and keeps token 0 alone."""
    from engines.adapters.llama_cpp import Candidates, LlamaCppEngine

    logits = np.log(np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=np.float32))
    drawn = set()
    for seed in range(40):
        settings = SamplerSettings(temp=1.0, top_k=3, top_p=0.5, seed=seed)
        chain = LlamaCppEngine._choice(settings)
        candidates = Candidates(logits)
        candidates.apply(chain)
        llama_cpp.llama_sampler_free(chain)
        drawn.add(candidates.selected())
    assert drawn == {0}
    # Without top_k, top-p alone keeps tokens 0 and 1, as the protocol does.
    drawn = set()
    for seed in range(40):
        chain = LlamaCppEngine._choice(SamplerSettings(temp=1.0, top_p=0.5, seed=seed))
        candidates = Candidates(logits)
        candidates.apply(chain)
        llama_cpp.llama_sampler_free(chain)
        drawn.add(candidates.selected())
    assert drawn == {0, 1}
