"""Faults in the reference API: bad settings are refused before the cache is touched, and a
generation that fails leaves the prompt cache holding exactly what the caller was given.

Every test uses the dummy model (260 tokens). "Consistent" is checked the strongest way:
greedy decoding resumed from the rolled-back cache must give the tokens an uninterrupted
run gives, which fails if the cache held one position too many or too few.
"""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from reference import load, make_prompt_cache, make_sampler, stream_generate
from reference.generate import generate_step
from reference.kv_cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache

PROMPT = [1, 72, 101, 108, 108, 111]


@pytest.fixture(scope="module")
def dummy():
    return load("dummy")


def untouched(cache) -> bool:
    return all(c.offset == 0 and c.keys is None for c in cache)


def greedy(model, prompt, n, cache=None) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache)
    return [token for token, _ in steps]


def assert_holds(model, cache, given: list[int], expected: list[int]) -> None:
    """``cache`` holds exactly the prompt and ``given`` (as a clean run's cache does), and
    resuming from it (the last position taken back and fed again) continues ``expected``."""
    clean = make_prompt_cache(model)
    greedy(model, PROMPT, len(given), clean)  # one step ahead: the last token is in it too
    for layer, reference in zip(cache, clean):
        assert layer.offset == reference.offset == len(PROMPT) + len(given)
        keys, reference_keys = layer.state[0], reference.state[0]
        assert mx.allclose(keys, reference_keys, atol=1e-5).item()
    trim_prompt_cache(cache, 1)
    resumed = greedy(model, [given[-1]], len(expected) - len(given), cache)
    assert given + resumed == expected


# -- sampler settings: refused when made, whatever the temperature ---------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temp": math.nan}, "temp must be a finite number"),
        ({"temp": math.inf}, "temp must be a finite number"),
        ({"temp": -0.5}, "temp must be a finite number >= 0"),
        ({"temp": "0.7"}, "temp must be"),
        ({"temp": 1.0, "top_p": math.nan}, r"top_p must be in \[0, 1\]"),
        ({"temp": 1.0, "top_p": 1.5}, r"top_p must be in \[0, 1\]"),
        ({"temp": 0.0, "top_p": -0.1}, r"top_p must be in \[0, 1\]"),  # greedy, still refused
        ({"temp": 1.0, "min_p": math.nan}, r"min_p must be in \[0, 1\]"),
        ({"temp": 1.0, "min_p": 2.0}, r"min_p must be in \[0, 1\]"),
        ({"temp": 1.0, "top_k": -1}, "top_k must be an integer >= 0"),
        ({"temp": 1.0, "top_k": 2.5}, "top_k must be an integer"),
        ({"temp": 1.0, "top_k": True}, "top_k must be an integer"),
        ({"temp": 1.0, "min_tokens_to_keep": 0}, "min_tokens_to_keep must be a positive"),
    ],
)
def test_bad_sampler_settings_are_refused_when_the_sampler_is_made(settings, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**settings)


def test_top_k_beyond_the_vocabulary_is_refused_before_the_prompt_enters_the_cache(dummy):
    model, tokenizer = dummy
    cache = make_prompt_cache(model)
    sampler = make_sampler(temp=1.0, top_k=300)  # the dummy vocabulary has 260 tokens
    with pytest.raises(ValueError, match="top_k must be below the vocabulary size 260"):
        list(
            stream_generate(
                model, tokenizer, PROMPT, max_tokens=4, sampler=sampler, prompt_cache=cache
            )
        )
    assert untouched(cache)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": [1.5, 2.0]}, ValueError, "token ids must be integers, got 1.5"),
        ({"prompt": [True, 5]}, ValueError, "token ids must be integers, got True"),
        ({"prompt": mx.array([1.0, 2.0])}, ValueError, "integers, got an array of"),
        ({"max_tokens": True}, ValueError, "max_tokens must be a positive integer"),
        ({"sampler": "greedy"}, TypeError, "sampler must be callable"),
        ({"logits_processors": [None]}, TypeError, r"logits_processors\[0\] must be callable"),
        ({"prefill_step_size": 2.0}, ValueError, "prefill_step_size must be a positive"),
    ],
)
def test_bad_generation_arguments_leave_the_cache_untouched(dummy, kwargs, error, message):
    model, _ = dummy
    cache = make_prompt_cache(model)
    arguments = {"prompt": PROMPT, "max_tokens": 3, "prompt_cache": cache} | kwargs
    prompt = arguments.pop("prompt")
    with pytest.raises(error, match=message):
        list(generate_step(prompt, model, **arguments))
    assert untouched(cache)


def test_nan_embeddings_are_refused_before_the_cache_is_touched(dummy):
    model, _ = dummy
    cache = make_prompt_cache(model)
    embeddings = mx.full((3, model.args.hidden_size), math.nan)
    with pytest.raises(ValueError, match="NaN or infinite"):
        list(
            generate_step(
                mx.array([], dtype=mx.int32),
                model,
                max_tokens=2,
                prompt_cache=cache,
                input_embeddings=embeddings,
            )
        )
    assert untouched(cache)


# -- failures during generation: the cache holds what the caller was given --------------------


def failing_sampler(fail_at: int, failure):
    """Greedy until call ``fail_at`` (0-based), then ``failure(logprobs)``."""
    calls = 0

    def sampler(logprobs):
        nonlocal calls
        calls += 1
        if calls - 1 == fail_at:
            return failure(logprobs)
        return mx.argmax(logprobs, axis=-1)

    return sampler


def raise_error(logprobs):
    raise RuntimeError("sampler broke")


def out_of_vocabulary(logprobs):
    return mx.array([logprobs.shape[-1] + 5])


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        (raise_error, RuntimeError, "sampler broke"),
        (out_of_vocabulary, ValueError, r"chose token 265, outside the vocabulary \[0, 260\)"),
    ],
)
@pytest.mark.parametrize("fail_at", [0, 3])
def test_a_failed_generation_rolls_the_cache_back_to_what_was_given(
    dummy, failure, error, message, fail_at
):
    model, _ = dummy
    expected = greedy(model, PROMPT, 8)
    cache = make_prompt_cache(model)
    given = []
    # The sampler's call k chooses token k; one step ahead, call k happens before token k-1
    # is handed out, so a failure at call k leaves k-1 tokens given (none for k <= 1).
    with pytest.raises(error, match=message):
        for token, _ in generate_step(
            mx.array(PROMPT),
            model,
            max_tokens=8,
            prompt_cache=cache,
            sampler=failing_sampler(fail_at, failure),
        ):
            given.append(token)
    assert given == expected[: len(given)]
    if given:
        assert_holds(model, cache, given, expected)
    else:  # nothing given: nothing new in the cache
        assert all(c.offset == 0 for c in cache)
        assert greedy(model, PROMPT, 8, cache) == expected


def test_an_exception_during_prefill_leaves_nothing_in_the_cache(dummy):
    model, _ = dummy
    cache = make_prompt_cache(model)

    def broken_processor(tokens, logits):
        raise RuntimeError("processor broke")

    with pytest.raises(RuntimeError, match="processor broke"):
        list(
            generate_step(
                mx.array(PROMPT),
                model,
                max_tokens=4,
                prompt_cache=cache,
                prefill_step_size=2,
                logits_processors=[broken_processor],
            )
        )
    assert all(c.offset == 0 for c in cache)
    assert greedy(model, PROMPT, 4, cache) == greedy(model, PROMPT, 4)


def test_stopping_early_keeps_every_token_given_in_the_cache(dummy):
    model, _ = dummy
    expected = greedy(model, PROMPT, 6)
    cache = make_prompt_cache(model)
    steps = generate_step(mx.array(PROMPT), model, max_tokens=6, prompt_cache=cache)
    given = [next(steps)[0] for _ in range(2)]
    steps.close()  # the caller stops: not a failure, nothing is rolled back
    assert_holds(model, cache, given, expected)


def test_a_sliding_window_that_evicted_cannot_roll_back_and_is_marked_unusable(dummy):
    model, _ = dummy
    cache = make_prompt_cache(model, max_kv_size=4)  # 6 prompt positions: eviction happens
    with pytest.raises(RuntimeError, match="sampler broke"):
        list(
            generate_step(
                mx.array(PROMPT),
                model,
                max_tokens=5,
                prompt_cache=cache,
                sampler=failing_sampler(2, raise_error),
            )
        )
    with pytest.raises(ValueError, match="prompt_cache is unusable"):
        list(generate_step(mx.array([5]), model, max_tokens=2, prompt_cache=cache))


# -- prompt-cache files: metadata checked before use -----------------------------------------


def saved_cache(model, path, **header):
    cache = make_prompt_cache(model)
    greedy(model, PROMPT, 2, cache)
    save_prompt_cache(str(path), cache, {"note": "ok"})
    arrays, metadata = mx.load(str(path), return_metadata=True)
    metadata.update(header)
    mx.save_safetensors(str(path), arrays, metadata)
    return arrays


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"lmconform.layers": "not json"}, "metadata 'lmconform.layers' is not valid JSON"),
        ({"lmconform.layers": '{"a": 1}'}, "metadata 'lmconform.layers' must be a JSON list"),
        ({"lmconform.user": "[1]"}, "metadata 'lmconform.user' must be a JSON dict"),
        ({"lmconform.layers": '[{"class": "Pickle", "offset": 0}]'}, "class 'Pickle' is not"),
        ({"lmconform.layers": '[{"class": "KVCache", "offset": -1}]'}, "must be integers >= 0"),
        ({"lmconform.layers": '[{"class": "KVCache", "offset": 3}]'}, "offset 3 does not match"),
        ({"lmconform.layers": '[{"class": "KVCache"}]'}, "a KVCache has"),
        (
            {
                "lmconform.layers": '[{"class": "RotatingKVCache", "offset": 0, "max_size": 2,'
                ' "keep": 4}]'
            },
            "do not describe a RotatingKVCache",
        ),
    ],
)
def test_a_damaged_prompt_cache_file_is_refused_naming_the_file(dummy, tmp_path, header, message):
    model, _ = dummy
    path = tmp_path / "cache.safetensors"
    saved_cache(model, path, **header)
    with pytest.raises(ValueError, match=message) as raised:
        load_prompt_cache(str(path))
    assert str(path) in str(raised.value)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "cache.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_prompt_cache(str(path))


def test_a_sound_prompt_cache_file_loads_and_continues_exactly(dummy, tmp_path):
    model, _ = dummy
    path = tmp_path / "cache.safetensors"
    saved_cache(model, path)
    cache, user = load_prompt_cache(str(path), return_metadata=True)
    assert user == {"note": "ok"} and all(c.offset == len(PROMPT) + 2 for c in cache)
    assert_holds(model, cache, greedy(model, PROMPT, 2), greedy(model, PROMPT, 5))
