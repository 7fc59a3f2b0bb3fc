"""reference/generate.py pinned down: the fields of every GenerationResponse (counts,
rates, finish reasons), what ``generate(verbose=True)`` prints, BOS handling of string
prompts, what speculative decoding refuses or drops, the progress callback, the
defaults of generate_step, what the model is fed in place of a sampled id outside the
vocabulary, the roll-back of a continued cache, the ids processors see, and models of
one layer, no layer or a one-token vocabulary."""

from __future__ import annotations

import re
import time
from itertools import islice

import mlx.core as mx
import pytest

from reference import generate, generate_step, stream_generate
from reference.dummy import DUMMY_MODELS, dummy_config, dummy_hf_tokenizer, dummy_weights
from reference.generate import as_wrapper, encode_prompt, roll_back
from reference.kv_cache import KVCache, RotatingKVCache, make_prompt_cache
from reference.models import build_model
from reference.tokenizer import TokenizerWrapper

PROMPT = "The quick brown fox"


def test_every_response_counts_and_only_the_last_has_a_finish_reason(dummy):
    model, tokenizer = dummy
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=5))
    prompt_size = len(tokenizer.encode(PROMPT))
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4, 5]
    assert [r.finish_reason for r in responses] == [None, None, None, None, "length"]
    assert {r.prompt_tokens for r in responses} == {prompt_size}
    assert not any(r.from_draft for r in responses)
    assert all(r.prompt_tps > 0 and r.generation_tps > 0 for r in responses)
    # Peak memory in GB: MLX's peak for the whole process (models other tests keep alive
    # count too), so judged against MLX's own figure, not an absolute bound.
    peak_gb = mx.get_peak_memory() / 1e9
    assert all(0 < r.peak_memory <= peak_gb for r in responses)
    assert responses[-1].peak_memory == pytest.approx(peak_gb, rel=0.01)
    plain = list(generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=5))
    assert [r.token for r in responses] == [t for t, _ in plain]
    for r, (_, logprobs) in zip(responses, plain):
        assert mx.abs(r.logprobs - logprobs).max().item() < 1e-5
    assert "".join(r.text for r in responses) == tokenizer.decode([t for t, _ in plain])


def test_eos_ends_with_stop_and_adds_no_text(dummy):
    model, tokenizer = dummy
    first = list(stream_generate(model, tokenizer, PROMPT, max_tokens=3))
    stops_at = first[1].token  # make the second token an EOS of this generation
    wrapper = TokenizerWrapper(tokenizer.tokenizer, eos_token_ids=[stops_at])
    responses = list(stream_generate(model, wrapper, PROMPT, max_tokens=3))
    assert [r.token for r in responses] == [first[0].token, stops_at]
    assert [r.finish_reason for r in responses] == [None, "stop"]
    assert responses[-1].text == "" and responses[-1].generation_tokens == 2
    one = list(stream_generate(model, tokenizer, PROMPT, max_tokens=1))
    assert [(r.generation_tokens, r.finish_reason) for r in one] == [(1, "length")]


def test_verbose_generate_prints_the_text_then_the_counts(dummy, capsys):
    model, tokenizer = dummy
    text = generate(model, tokenizer, PROMPT, verbose=True, max_tokens=4)
    assert text == generate(model, tokenizer, PROMPT, max_tokens=4)
    out = capsys.readouterr().out.split("\n")
    prompt_size = len(tokenizer.encode(PROMPT))
    assert out[0] == text and out[-1] == ""
    assert re.fullmatch(rf"Prompt: {prompt_size} tokens, \d+\.\d{{3}} tokens-per-sec", out[1])
    assert re.fullmatch(r"Generation: 4 tokens, \d+\.\d{3} tokens-per-sec", out[2])
    assert re.fullmatch(r"Peak memory: \d+\.\d{3} GB", out[3])
    assert len(out) == 5


def test_a_string_prompt_gets_one_bos_however_it_starts():
    with_bos = TokenizerWrapper(dummy_hf_tokenizer(bos_token="<|endoftext|>", add_bos_token=True))
    bos = with_bos.bos_token_id
    hi = with_bos.encode("hi", add_special_tokens=False)
    assert encode_prompt(with_bos, "hi").tolist() == [bos, *hi]
    assert encode_prompt(with_bos, "<|endoftext|>hi").tolist() == [bos, *hi]
    assert encode_prompt(with_bos, [5, 6]).tolist() == [5, 6]  # ids are taken as they are


def test_a_plain_tokenizer_is_wrapped_once():
    hf = dummy_hf_tokenizer()
    wrapped = as_wrapper(hf)
    assert isinstance(wrapped, TokenizerWrapper) and wrapped.tokenizer is hf
    assert as_wrapper(wrapped) is wrapped


def test_speculative_decoding_refuses_embeddings_and_drops_what_it_ignores(dummy, dummy_draft):
    model, tokenizer = dummy
    embeddings = model.model.embed_tokens(mx.array(tokenizer.encode(PROMPT)))
    with pytest.raises(ValueError) as raised:
        list(stream_generate(model, tokenizer, "", input_embeddings=embeddings, draft_model=model))
    assert str(raised.value) == "speculative decoding does not support input_embeddings"
    plain = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=4)]
    calls = []
    spec = list(
        stream_generate(
            model,
            tokenizer,
            PROMPT,
            max_tokens=4,
            draft_model=dummy_draft[0],
            num_draft_tokens=2,
            max_kv_size=None,
            input_embeddings=None,
            prompt_progress_callback=lambda done, total: calls.append(done),
            stream=mx.default_stream(mx.default_device()),
        )
    )
    assert [r.token for r in spec] == plain and calls == []
    assert {r.prompt_tokens for r in spec} == {len(tokenizer.encode(PROMPT))}
    # Without a draft, num_draft_tokens is ignored rather than refused.
    same = stream_generate(model, tokenizer, PROMPT, max_tokens=4, num_draft_tokens=3)
    assert [r.token for r in same] == plain


def test_embeddings_count_as_the_prompt(dummy):
    model, tokenizer = dummy
    ids = tokenizer.encode(PROMPT)
    embeddings = model.model.embed_tokens(mx.array(ids))
    responses = list(
        stream_generate(model, tokenizer, [], input_embeddings=embeddings, max_tokens=3)
    )
    assert {r.prompt_tokens for r in responses} == {len(ids)}
    assert [r.token for r in responses] == [
        r.token for r in stream_generate(model, tokenizer, ids, max_tokens=3)
    ]


def test_progress_goes_from_zero_to_the_prompt_size_once_per_chunk(dummy):
    model, tokenizer = dummy
    ids = mx.array(tokenizer.encode(PROMPT))
    calls = []
    steps = generate_step(
        ids,
        model,
        max_tokens=3,
        prefill_step_size=8,
        prompt_progress_callback=lambda done, total: calls.append((done, total)),
    )
    list(steps)
    n = ids.size
    # Prefill feeds all but the last token in chunks of 8; the last comes with the first step.
    chunks = [(min(done, n - 1), n) for done in range(8, n - 1 + 8, 8)]
    assert calls == [(0, n), *chunks, (n, n)]


def test_the_samplers_choice_is_checked_and_token_zero_is_a_token(dummy):
    model, tokenizer = dummy
    ids = mx.array(tokenizer.encode(PROMPT))
    zeros = generate_step(ids, model, max_tokens=3, sampler=lambda lp: mx.array([0]))
    assert [t for t, _ in zeros] == [0, 0, 0]
    with pytest.raises(ValueError) as raised:
        list(generate_step(ids, model, max_tokens=2, sampler=lambda lp: mx.array([1, 2])))
    assert str(raised.value) == "the sampler returned 2 values for one position"


def test_rolling_back_to_the_current_offset_trims_nothing_and_an_evicted_window_is_marked():
    cache = [KVCache(), KVCache()]
    for layer in cache:
        keys = mx.zeros((1, 1, 5, 2))
        layer.update_and_fetch(keys, keys)
    roll_back(cache, 5)
    assert [layer.offset for layer in cache] == [5, 5]
    roll_back(cache, 3)
    assert [layer.offset for layer in cache] == [3, 3]
    window = RotatingKVCache(max_size=4, keep=1)
    keys = mx.zeros((1, 1, 6, 2))
    window.update_and_fetch(keys, keys)
    roll_back([window], 2)
    assert window.offset == 6 and window.unusable == (
        "a generation failed after its sliding window had evicted positions, so the "
        "cache could not be rolled back"
    )


def test_no_limit_and_the_default_limit_reach_the_decoder(dummy, dummy_draft):
    model, tokenizer = dummy
    endless = TokenizerWrapper(tokenizer.tokenizer, eos_token_ids=[])
    assert len(list(stream_generate(model, endless, PROMPT))) == 256
    for draft in (None, dummy_draft[0]):
        steps = stream_generate(model, endless, PROMPT, max_tokens=-1, draft_model=draft)
        assert len(list(islice(steps, 258))) == 258
    # Speculative settings reach the speculative decoder: 3 proposals per round.
    spec = stream_generate(model, endless, PROMPT, max_tokens=8, draft_model=model,
                           num_draft_tokens=3)  # fmt: skip
    assert [r.from_draft for r in spec] == [True, True, True, False] * 2


def test_rates_are_tokens_over_the_time_they_took(dummy):
    """Each rate is bounded by clocks read outside: no faster than the tokens over the
    time between asking for a response and the first one arriving, no slower than the
    tokens over the whole call."""
    model, tokenizer = dummy
    start = time.perf_counter()
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=3))
    total = time.perf_counter() - start
    prompt_size = len(tokenizer.encode(PROMPT))
    for r in responses:
        assert r.prompt_tps >= prompt_size / total
        assert r.generation_tps >= r.generation_tokens / total
    steps = stream_generate(model, tokenizer, PROMPT, max_tokens=3)
    next(steps)
    first = time.perf_counter()
    time.sleep(0.2)
    asked = time.perf_counter()
    second = next(steps)
    assert second.generation_tps <= second.generation_tokens / (asked - first)
    mx.reset_peak_memory()
    last = list(stream_generate(model, tokenizer, PROMPT, max_tokens=2))[-1]
    assert last.peak_memory == mx.get_peak_memory() / 1e9


def greedy_ids(steps) -> list[int]:
    return [token for token, _ in steps]


def test_generate_step_stops_after_256_tokens_by_default(dummy):
    """The default max_tokens is 256, as in mlx-lm (a model without layers, for speed)."""
    model, tokenizer = dummy
    ids = mx.array(tokenizer.encode(PROMPT))
    assert len(greedy_ids(generate_step(ids, Layerless(model)))) == 256


def test_prompts_are_prefilled_in_chunks_of_2048_by_default(dummy_draft):
    model, _ = dummy_draft
    ids = mx.arange(2050) % 200  # 2049 positions to prefill: a chunk of 2048, then one
    calls = []
    steps = generate_step(
        ids, model, max_tokens=1, prompt_progress_callback=lambda *call: calls.append(call)
    )
    list(steps)
    assert calls == [(0, 2050), (2048, 2050), (2049, 2050), (2050, 2050)]


def test_progress_reports_the_whole_prompt_before_the_first_token_is_handed_out(dummy):
    model, tokenizer = dummy
    ids = mx.array(tokenizer.encode(PROMPT))
    calls = []
    steps = generate_step(
        ids, model, max_tokens=3, prompt_progress_callback=lambda *call: calls.append(call)
    )
    next(steps)
    assert calls == [(0, ids.size), (ids.size - 1, ids.size), (ids.size, ids.size)]
    list(steps)
    assert calls[-1] == (ids.size, ids.size) and len(calls) == 3


def test_a_failure_in_a_continued_cache_rolls_back_to_where_the_call_found_it(dummy):
    """With a cache that already holds a conversation, a failure before the first token
    leaves what the cache held; one after a token leaves that plus the prompt and token."""
    model, tokenizer = dummy
    first = mx.array(tokenizer.encode(PROMPT))
    second = mx.array(tokenizer.encode(" jumps"))
    for fail_at, kept_new in ((2, 0), (3, second.size + 1)):
        cache = make_prompt_cache(model)
        list(generate_step(first, model, max_tokens=2, prompt_cache=cache))
        start = cache[0].offset
        before = [mx.array(layer.state[0][..., :start, :]) for layer in cache]
        calls = []

        def failing(logprobs, calls=calls, fail_at=fail_at):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("sampler failed")
            return mx.argmax(logprobs, axis=-1)

        steps = generate_step(second, model, max_tokens=4, sampler=failing, prompt_cache=cache)
        with pytest.raises(RuntimeError, match="sampler failed"):
            list(steps)
        assert [layer.offset for layer in cache] == [start + kept_new] * len(cache)
        for layer, kept in zip(cache, before):
            assert mx.array_equal(layer.state[0][..., :start, :], kept)


class Layerless:
    """A bigram model: ``dummy``'s embedding, final norm and head with no layer between,
    so its prompt cache is an empty list."""

    layers: tuple = ()

    def __init__(self, model):
        self.args, self.model, self.lm_head = model.args, model.model, model.lm_head

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.lm_head(self.model.norm(self.model.embed(inputs, input_embeddings)))


def test_a_model_without_layers_generates_from_an_empty_cache(dummy):
    model, tokenizer = dummy
    bigram = Layerless(model)
    ids = tokenizer.encode(PROMPT)
    expected = [ids[-1]]
    for _ in range(3):
        expected.append(mx.argmax(bigram(mx.array([[expected[-1]]]))[0, -1]).item())
    assert greedy_ids(generate_step(mx.array(ids), bigram, max_tokens=3)) == expected[1:]


def test_logits_processors_see_token_ids_of_the_prompts_integer_type(dummy):
    model, tokenizer = dummy
    ids = tokenizer.encode(PROMPT)
    seen = []

    def spy(tokens, logits):
        seen.append((tokens.dtype, tokens.tolist()))
        return logits

    for dtype in (mx.int32, mx.uint32):
        seen.clear()
        steps = generate_step(mx.array(ids, dtype=dtype), model, max_tokens=2,
                              logits_processors=[spy])  # fmt: skip
        tokens = greedy_ids(steps)
        assert seen[0] == (dtype, ids)
        assert all(mx.issubdtype(d, mx.integer) for d, _ in seen)
        assert [values for _, values in seen] == [ids, ids + tokens[:1], ids + tokens]


class Recording:
    """A model that records every batch of token ids it is fed."""

    def __init__(self, model):
        self.inner, self.fed = model, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        self.fed.append(inputs.tolist())
        return self.inner(inputs, cache=cache, input_embeddings=input_embeddings)


@pytest.mark.parametrize("bad", [260, 261, -1])
def test_a_sampled_id_outside_the_vocabulary_is_refused_and_the_model_is_fed_0(dummy, bad):
    """The dummy vocabulary is [0, 260): the bad id (the step after it already queued)
    reaches the model as 0, then the error; the cache keeps the prompt and one token."""
    model, tokenizer = dummy
    ids = tokenizer.encode(PROMPT)
    recording = Recording(model)
    calls = []

    def sampler(logprobs):
        calls.append(1)
        return mx.array([bad]) if len(calls) == 2 else mx.argmax(logprobs, axis=-1)

    cache = make_prompt_cache(model)
    steps = generate_step(mx.array(ids), recording, max_tokens=4, sampler=sampler,
                          prompt_cache=cache)  # fmt: skip
    first = next(steps)[0]
    with pytest.raises(ValueError) as raised:
        next(steps)
    assert str(raised.value) == f"the sampler chose token {bad}, outside the vocabulary [0, 260)"
    assert recording.fed == [[ids[:-1]], [ids[-1:]], [[first]], [[0]]]
    assert cache[0].offset == len(ids) + 1


def one_token_vocabulary_model():
    """``dummy-draft`` (one layer) with a vocabulary of one token."""
    spec = DUMMY_MODELS["dummy-draft"]
    model = build_model(dummy_config(spec) | {"vocab_size": 1})
    model.load_weights(list(dummy_weights(model, spec).items()))
    return model


def test_with_a_one_token_vocabulary_each_logprobs_is_a_vector_of_one_zero():
    steps = list(generate_step(mx.array([0, 0, 0]), one_token_vocabulary_model(), max_tokens=2))
    assert [token for token, _ in steps] == [0, 0]
    for _, logprobs in steps:
        assert logprobs.shape == (1,) and logprobs.tolist() == [0.0]
