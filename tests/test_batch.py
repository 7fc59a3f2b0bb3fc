"""Continuous batching equals single-sequence generation, row by row and step by step.

Every comparison is against ``stream_generate`` on the same prompt: greedy
tokens must be identical and the full log-probability vectors must agree
within 1e-4 at every step (float32 ``dummy``), whatever the batch composition,
prefill chunking, join/leave order or cache kind.
"""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from reference import KVCache, RotatingKVCache, make_logits_processors, stream_generate
from reference.batch import BatchGenerator, BatchResponse, batch_generate
from reference.batch_cache import PAD, BatchKVCache

ATOL = 1e-4


# -- helpers -------------------------------------------------------------------------------
def single(model, tokenizer, prompt, max_tokens, **kwargs):
    """(tokens, logprobs per step, finish_reason) from ``stream_generate``."""
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs))
    return (
        [r.token for r in responses],
        [r.logprobs for r in responses],
        responses[-1].finish_reason,
    )


def run(generator, prompts=None, uids=None, **insert_kwargs):
    """Insert ``prompts`` (or follow ``uids``) and drain the generator, in prompt order.

    Each result is (tokens, logprobs per step, finish_reason, prompt_cache).
    """
    uids = generator.insert(prompts, **insert_kwargs) if prompts is not None else uids
    results = {uid: ([], [], {}) for uid in uids}
    while responses := generator.next_generated():
        for r in responses:
            tokens, logprobs, end = results[r.uid]
            tokens.append(r.token)
            logprobs.append(r.logprobs)
            end.update(finish=r.finish_reason, cache=r.prompt_cache)
    return [(t, lp, end["finish"], end["cache"]) for t, lp, end in results.values()]


def assert_same(got, expected, label=""):
    tokens, logprobs, finish = got[:3]
    want_tokens, want_logprobs, want_finish = expected[:3]
    assert tokens == want_tokens, f"{label}: tokens {tokens} != single {want_tokens}"
    assert finish == want_finish, f"{label}: finish_reason {finish} != single {want_finish}"
    for step, (a, b) in enumerate(zip(logprobs, want_logprobs)):
        diff = mx.abs(a - b).max().item()
        assert diff <= ATOL, f"{label}: step {step} logprobs differ by {diff}"


def random_prompts(n, lengths=(1, 40), seed=0, vocab=256):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def generator(model, tokenizer, **kwargs):
    kwargs.setdefault("stop_tokens", sorted(tokenizer.eos_token_ids))
    return BatchGenerator(model, **kwargs)


class SlidingWindowModel:
    """A model whose own ``make_cache`` returns ``RotatingKVCache(max_size)`` layers."""

    def __init__(self, model, max_size, keep=0):
        self._model, self._max_size, self._keep = model, max_size, keep

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def make_cache(self):
        return [RotatingKVCache(self._max_size, self._keep) for _ in self._model.layers]


@pytest.fixture(scope="module")
def reference_runs(dummy):
    """``reference_runs(prompt, max_tokens, **kw)``: single-sequence results, memoised."""
    model, tokenizer = dummy
    memo = {}

    def get(prompt, max_tokens, **kwargs):
        key = (tuple(prompt), max_tokens, tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = single(model, tokenizer, prompt, max_tokens, **kwargs)
        return memo[key]

    return get


# -- batch equals single -------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
@pytest.mark.parametrize(
    "prefill_batch_size, completion_batch_size, prefill_step_size",
    [(8, 32, 2048), (2, 3, 5), (1, 1, 1), (3, 8, 7), (2, 2, 3)],
)
def test_batch_equals_single(
    dummy, reference_runs, batch_size, prefill_batch_size, completion_batch_size, prefill_step_size
):
    model, tokenizer = dummy
    prompts = random_prompts(batch_size, seed=batch_size)
    prompts[0] = prompts[0][:1]  # always one single-token prompt ...
    if batch_size > 1:
        prompts[-1] = (prompts[-1] * 40)[:40]  # ... and one of 40 tokens
    gen = generator(
        model,
        tokenizer,
        max_tokens=14,
        prefill_batch_size=prefill_batch_size,
        completion_batch_size=completion_batch_size,
        prefill_step_size=prefill_step_size,
    )
    for i, (got, prompt) in enumerate(zip(run(gen, prompts), prompts)):
        assert_same(got, reference_runs(prompt, 14), f"prompt {i} (length {len(prompt)})")


def test_per_prompt_max_tokens(dummy, reference_runs):
    model, tokenizer = dummy
    prompts = random_prompts(4, seed=11)
    results = run(generator(model, tokenizer, stop_tokens=[]), prompts, max_tokens=[2, 3, 4, 5])
    for (tokens, _, finish, _), n, prompt in zip(results, [2, 3, 4, 5], prompts):
        assert len(tokens) == n and finish == "length"
        want = single(model, tokenizer, prompt, 5)[0]
        assert tokens == want[:n]


def test_insert_while_decoding(dummy, reference_runs):
    model, tokenizer = dummy
    first, later = random_prompts(1, lengths=(6, 6), seed=5)[0], random_prompts(1, seed=6)[0]
    gen = generator(model, tokenizer, max_tokens=12, prefill_step_size=4)
    uids = gen.insert([first])
    seen = {uids[0]: []}
    for _ in range(5):
        for r in gen.next()[1]:
            seen[r.uid].append(r)
    assert seen[uids[0]], "the first prompt should be decoding by now"
    late_uid = gen.insert([later])[0]
    seen[late_uid] = []
    while responses := gen.next_generated():
        for r in responses:
            seen[r.uid].append(r)
    for uid, prompt in ((uids[0], first), (late_uid, later)):
        rs = seen[uid]
        got = ([r.token for r in rs], [r.logprobs for r in rs], rs[-1].finish_reason)
        assert_same(got, reference_runs(prompt, 12), f"uid {uid}")


def test_chunked_prefill_and_batch_limits(dummy):
    """Prompts go in ``prefill_step_size`` chunks; neither batch outgrows its size."""
    model, tokenizer = dummy
    gen = generator(
        model,
        tokenizer,
        max_tokens=3,
        prefill_batch_size=2,
        completion_batch_size=3,
        prefill_step_size=4,
    )
    uids = gen.insert(random_prompts(7, lengths=(10, 10), seed=13))
    progress = []
    while True:
        prompts, generated = gen.next()
        if not prompts and not generated:
            break
        assert len({r.uid for r in prompts}) <= 2 and len(generated) <= 3
        progress += [r.progress for r in prompts if r.uid == uids[0]]
    assert progress == [(4, 10), (8, 10), (10, 10)]


def test_needle_among_fillers(dummy, reference_runs):
    """One prompt, at random places among 15 random fillers, always gives its own output."""
    model, tokenizer = dummy
    needle = [ord(c) for c in "The quick brown fox"]
    for seed in range(5):
        rng = random.Random(100 + seed)
        fillers = random_prompts(15, seed=200 + seed)
        at = rng.randrange(16)
        prompts = fillers[:at] + [needle] + fillers[at:]
        max_tokens = [rng.randint(1, 16) for _ in prompts]
        max_tokens[at] = 16
        gen = generator(
            model,
            tokenizer,
            prefill_batch_size=rng.choice([2, 4, 8]),
            completion_batch_size=rng.choice([4, 8, 16]),
            prefill_step_size=rng.choice([3, 8, 2048]),
        )
        got = run(gen, prompts, max_tokens=max_tokens)[at]
        assert_same(got, reference_runs(needle, 16), f"needle at {at} (seed {seed})")


# -- sliding windows -----------------------------------------------------------------------
@pytest.mark.parametrize("max_kv_size", [4, 8])
def test_rotating_batch_equals_single(dummy, reference_runs, max_kv_size):
    """``max_kv_size`` gives a RotatingKVCache (keep 2 for 4, keep 4 for 8); prompts exceed it."""
    model, tokenizer = dummy
    prompts = random_prompts(5, lengths=(3, 30), seed=max_kv_size)
    gen = generator(
        model,
        tokenizer,
        max_tokens=12,
        max_kv_size=max_kv_size,
        prefill_batch_size=3,
        completion_batch_size=4,
        prefill_step_size=4,
    )
    for i, (got, prompt) in enumerate(zip(run(gen, prompts), prompts)):
        want = reference_runs(prompt, 12, max_kv_size=max_kv_size)
        assert_same(got, want, f"prompt {i} (length {len(prompt)})")


def test_model_with_rotating_make_cache(dummy):
    model, tokenizer = dummy
    windowed = SlidingWindowModel(model, max_size=4)
    prompts = random_prompts(4, lengths=(2, 20), seed=3)
    gen = generator(windowed, tokenizer, max_tokens=12, prefill_batch_size=2, prefill_step_size=3)
    results = run(gen, prompts)
    for i, (got, prompt) in enumerate(zip(results, prompts)):
        assert_same(got, single(windowed, tokenizer, prompt, 12), f"prompt {i}")
        assert isinstance(got[3][0], RotatingKVCache) and got[3][0].max_size == 4


def test_keep_is_honoured(dummy, reference_runs):
    """mlx-lm 0.32.2's batched rotating cache drops the ``keep`` sink positions.

    Here they matter: with keep=4 the output differs from keep=0 (so a batch
    cache that ignored ``keep`` would fail ``test_rotating_batch_equals_single``),
    and the batched output follows the single RotatingKVCache, sinks included.
    """
    model, tokenizer = dummy
    prompt = random_prompts(1, lengths=(24, 24), seed=9)[0]
    with_sinks = reference_runs(prompt, 12, max_kv_size=8)
    without = single(SlidingWindowModel(model, 8, keep=0), tokenizer, prompt, 12)
    assert with_sinks[0] != without[0]
    got = run(
        generator(SlidingWindowModel(model, 8, keep=4), tokenizer, max_tokens=12),
        [prompt, prompt[:5]],
    )[0]
    assert_same(got, with_sinks, "keep=4")


def test_window_is_chunk_independent(dummy):
    """Prompt three times the window: chunk sizes 1, 3, 8, 2048 give one output."""
    model, tokenizer = dummy
    prompt = random_prompts(1, lengths=(24, 24), seed=21)[0]
    fillers = random_prompts(3, lengths=(1, 30), seed=22)
    outputs = []
    for step in (1, 3, 8, 2048):
        outputs.append(single(model, tokenizer, prompt, 10, max_kv_size=8, prefill_step_size=step))
        gen = generator(model, tokenizer, max_tokens=10, max_kv_size=8, prefill_step_size=step)
        outputs.append(run(gen, fillers[:1] + [prompt] + fillers[1:])[1])
    for got in outputs[1:]:
        assert_same(got, outputs[0], "chunking")


# -- continued generation ----------------------------------------------------------------
@pytest.mark.parametrize("max_kv_size", [None, 8])
def test_continue_from_batched_caches(dummy, max_kv_size):
    model, tokenizer = dummy
    first = random_prompts(3, lengths=(1, 20), seed=31)
    second = random_prompts(3, lengths=(1, 12), seed=32)
    gen = generator(model, tokenizer, max_tokens=8, max_kv_size=max_kv_size, prefill_step_size=5)
    caches = [r[3] for r in run(gen, first)]
    offsets = [c[0].offset for c in caches]
    results = run(gen, second, caches=caches)
    assert [c[0].offset for c in caches] == offsets, "insert must not modify the given caches"
    for i, (got, prompt, cache) in enumerate(zip(results, second, caches)):
        assert_same(got, single(model, tokenizer, prompt, 8, prompt_cache=cache), f"row {i}")


def test_continue_from_single_caches(dummy):
    model, tokenizer = dummy
    first = random_prompts(2, lengths=(5, 15), seed=41)
    second = random_prompts(2, lengths=(1, 6), seed=42)

    def primed(prompt):
        cache = [KVCache() for _ in model.layers]
        single(model, tokenizer, prompt, 6, prompt_cache=cache)
        return cache

    results = run(
        generator(model, tokenizer, max_tokens=8), second, caches=[primed(p) for p in first]
    )
    for got, p1, p2 in zip(results, first, second):
        assert_same(got, single(model, tokenizer, p2, 8, prompt_cache=primed(p1)), "continued")


def test_finished_cache_equals_single_cache(dummy):
    """The cache handed back at the end holds what the single run's cache holds."""
    model, tokenizer = dummy
    prompts = random_prompts(3, lengths=(1, 25), seed=51)
    for max_kv_size in (None, 8):
        results = run(
            generator(model, tokenizer, max_tokens=6, stop_tokens=[], max_kv_size=max_kv_size),
            prompts,
        )
        for (_, _, _, got), prompt in zip(results, prompts):
            want = [RotatingKVCache(8, 4) if max_kv_size else KVCache() for _ in model.layers]
            single(model, tokenizer, prompt, 6, prompt_cache=want)
            for a, b in zip(got, want):
                assert type(a) is type(b) and a.offset == b.offset
                assert mx.abs(a.state[0] - b.state[0]).max().item() <= ATOL


# -- per-sequence settings ---------------------------------------------------------------
def test_per_sequence_samplers_and_processors(dummy, reference_runs):
    model, tokenizer = dummy
    prompts = random_prompts(4, seed=61)

    def least_likely(logprobs):
        return mx.argmin(logprobs, axis=-1)

    penalty = make_logits_processors(repetition_penalty=1.5, logit_bias={65: 3.0})
    gen = generator(model, tokenizer, max_tokens=10)
    results = run(
        gen,
        prompts,
        samplers=[None, least_likely, None, None],
        logits_processors=[None, None, penalty, None],
    )
    assert_same(results[0], reference_runs(prompts[0], 10), "default row")
    assert_same(
        results[1], single(model, tokenizer, prompts[1], 10, sampler=least_likely), "sampler row"
    )
    assert_same(
        results[2],
        single(model, tokenizer, prompts[2], 10, logits_processors=penalty),
        "processor row",
    )
    assert_same(results[3], reference_runs(prompts[3], 10), "default row")


def test_processors_see_the_same_history_as_single(dummy):
    """Same calls, same token histories, one step ahead (the last call sees max_tokens)."""
    model, tokenizer = dummy
    prompt, other = random_prompts(2, lengths=(3, 12), seed=65)

    def recorder(calls):
        def processor(tokens, logits):
            calls.append(tokens.tolist())
            return logits

        return [processor]

    alone, batched = [], []
    single(model, tokenizer, prompt, 6, logits_processors=recorder(alone))
    gen = generator(model, tokenizer, max_tokens=6, prefill_step_size=2)
    run(gen, [other, prompt], logits_processors=[None, recorder(batched)])
    assert batched == alone and len(alone[-1]) == len(prompt) + 6


def test_stop_sequences_end_the_right_sequence(dummy, reference_runs):
    model, tokenizer = dummy
    prompts = random_prompts(3, seed=71)
    full = [reference_runs(p, 10) for p in prompts]
    target = 1
    stop = full[target][0][3:5]  # a two-token stop sequence from row 1's own output
    gen = generator(model, tokenizer, max_tokens=10)
    results = run(gen, prompts, stop_sequences=[None, [stop], None])
    tokens, _, finish, _ = results[target]
    end = next(i for i in range(1, len(full[target][0])) if full[target][0][i - 1 : i + 1] == stop)
    assert finish == "stop" and tokens == full[target][0][: end + 1]
    for i in (0, 2):
        assert_same(results[i], full[i], f"row {i}")


def test_default_stop_tokens_give_stop(dummy):
    model, tokenizer = dummy
    prompt = random_prompts(1, seed=81)[0]
    tokens = single(model, tokenizer, prompt, 6)[0]
    results = run(BatchGenerator(model, max_tokens=6, stop_tokens=[tokens[2]]), [prompt])
    assert results[0][0] == tokens[:3] and results[0][2] == "stop"


# -- batch_generate, remove, stats ---------------------------------------------------------
def test_batch_generate(dummy):
    model, tokenizer = dummy
    prompts = ["Hello, world!", "Once upon a time", "1, 2, 3, 4,"]
    out = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=[5, 8, 3],
        return_token_ids=True,
        return_logprobs=True,
        return_prompt_caches=True,
        prefill_batch_size=2,
    )
    assert isinstance(out, BatchResponse) and len(out.caches) == 3
    for i, prompt in enumerate(prompts):
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=[5, 8, 3][i]))
        want = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
        assert out.token_ids[i] == want
        assert out.texts[i] == tokenizer.decode(want)
        assert np.allclose(
            out.logprobs[i],
            [
                r.logprobs[r.token].item()
                for r in responses
                if r.token not in tokenizer.eos_token_ids
            ],
            atol=ATOL,
        )
    assert out.stats.generation_tokens >= sum(len(t) for t in out.token_ids)
    assert out.stats.prompt_tokens > 0 and out.stats.generation_tps > 0


def test_remove(dummy, reference_runs):
    model, tokenizer = dummy
    prompts = random_prompts(5, seed=91)
    gen = generator(model, tokenizer, max_tokens=10, prefill_batch_size=2, prefill_step_size=4)
    uids = gen.insert(prompts)
    for _ in range(6):
        gen.next()
    removed = gen.remove([uids[0], uids[3], uids[4]], return_prompt_caches=True)
    assert set(removed) == {uids[0], uids[3], uids[4]}
    for cache, tokens in removed.values():
        assert isinstance(cache[0], KVCache) and cache[0].offset == len(tokens)
    for got, prompt in zip(run(gen, uids=uids[1:3]), prompts[1:3]):
        assert_same(got, reference_runs(prompt, 10), "kept row")


def test_stats_count_the_work(dummy):
    model, tokenizer = dummy
    gen = generator(model, tokenizer, max_tokens=4, stop_tokens=[])
    gen.insert(random_prompts(3, lengths=(2, 9), seed=7))
    with gen.stats() as stats:
        while gen.next_generated():
            pass
    assert stats.generation_tokens == 12 and stats.generation_steps >= 4
    assert stats.prompt_tokens > 0 and stats.wall_time > 0


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": [[1, 2], []]}, "empty"),
        ({"prompts": [[1, 2]], "max_tokens": [0]}, "max_tokens"),
        ({"prompts": [[1, 2]], "max_tokens": [-1]}, "max_tokens"),
        ({"prompts": [[1, 2], [3]], "max_tokens": [4]}, "max_tokens"),
        ({"prompts": [[1, 2], [3]], "samplers": [None]}, "samplers"),
        (
            {"prompts": [[1, 2]], "caches": [[RotatingKVCache(8, 4), RotatingKVCache(8, 4)]]},
            "caches",
        ),
        ({"prompts": [[1, 2]], "caches": [[KVCache()]]}, "caches"),
        ({"prompts": [[1, 99999]]}, "vocabulary"),
    ],
)
def test_bad_input_is_rejected_and_generator_survives(dummy, reference_runs, kwargs, message):
    model, tokenizer = dummy
    gen = generator(model, tokenizer, max_tokens=6)
    with pytest.raises(ValueError, match=message):
        gen.insert(**kwargs)
    prompt = [ord(c) for c in "still works"]
    assert_same(run(gen, [prompt])[0], reference_runs(prompt, 6), "after the error")


def test_bad_generator_settings(dummy):
    model, _ = dummy
    for kwargs in (
        {"max_kv_size": 1},
        {"prefill_step_size": 0},
        {"max_tokens": 0},
        {"completion_batch_size": 0},
    ):
        with pytest.raises(ValueError):
            BatchGenerator(model, **kwargs)


# -- the batch cache on its own ------------------------------------------------------------
def test_batch_cache_layout_and_mask():
    """Left padding is labelled PAD and never attended; positions drive RoPE offsets."""
    cache = BatchKVCache.merge([KVCache(), KVCache()])
    cache.prepare([2, 0])
    assert cache.offset.tolist() == [-2, 0]
    mask = np.array(cache.make_mask(3))[:, 0]
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    keys = mx.ones((2, 1, 3, 2))
    cache.update_and_fetch(keys, keys)
    assert cache.positions.tolist() == [[PAD, PAD, 0], [0, 1, 2]]
    assert cache.next_position.tolist() == [1, 3] and cache.offset.tolist() == [1, 3]
    cache.filter([0])
    assert cache.positions.tolist() == [[0]] and cache.keys.shape[2] == 1
    assert cache.extract(0).offset == 1


def test_rotating_batch_cache_keeps_sinks():
    cache = BatchKVCache(1, max_size=6, keep=2)
    keys = mx.zeros((1, 1, 10, 2))
    cache.update_and_fetch(keys, keys)
    assert cache.positions.tolist() == [[0, 1, 7, 8, 9]]
    single = cache.extract(0)
    assert single.stored_positions().tolist() == [0, 1, 7, 8, 9]


# -- the real model ------------------------------------------------------------------------
SMOLLM_TOKENS = 6


@pytest.mark.smollm
def test_smollm_batch_equals_single(smollm):
    model, tokenizer = smollm
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    prompts = [chat, tokenizer.encode("The quick brown fox"), [504]]
    results = run(
        generator(model, tokenizer, max_tokens=SMOLLM_TOKENS, prefill_step_size=8), prompts
    )
    for i, (got, prompt) in enumerate(zip(results, prompts)):
        assert_same(got, single(model, tokenizer, prompt, SMOLLM_TOKENS), f"prompt {i}")
    assert results[0][0][:SMOLLM_TOKENS] == [504, 3575, 282, 4649, 314, 7042][:SMOLLM_TOKENS]


@pytest.mark.smollm
def test_smollm_rotating_and_continued(smollm):
    model, tokenizer = smollm
    prompts = [
        tokenizer.encode("Once upon a time, in a land far away,"),
        tokenizer.encode("1, 2, 3,"),
    ]
    gen = generator(model, tokenizer, max_tokens=4, max_kv_size=6, prefill_step_size=3)
    first = run(gen, prompts)
    for i, (got, prompt) in enumerate(zip(first, prompts)):
        assert_same(got, single(model, tokenizer, prompt, 4, max_kv_size=6), f"prompt {i}")
    follow_up = [tokenizer.encode(" and"), tokenizer.encode(" 4")]
    second = run(gen, follow_up, caches=[r[3] for r in first])
    for i, (got, prompt) in enumerate(zip(second, follow_up)):
        want = single(model, tokenizer, prompt, 4, prompt_cache=first[i][3])
        assert_same(got, want, f"continued {i}")
