"""reference/generate.py pinned down: the fields of every GenerationResponse (counts,
rates, finish reasons), what ``generate(verbose=True)`` prints, BOS handling of string
prompts, what speculative decoding refuses or drops, and the progress callback."""

from __future__ import annotations

import re
import time
from itertools import islice

import mlx.core as mx
import pytest

from reference import generate, generate_step, stream_generate
from reference.dummy import dummy_hf_tokenizer
from reference.generate import as_wrapper, encode_prompt, roll_back
from reference.kv_cache import KVCache, RotatingKVCache
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
