"""Single-sequence generation: every behaviour of mlx-lm's generation tests, and more.

Each behaviour runs on the tiny ``dummy`` model and on the real ``smollm2-135m``
(short prompts and few tokens: MLX decodes ~6 tokens/s on this CPU).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from reference import (
    generate,
    generate_step,
    load,
    make_logits_processors,
    make_prompt_cache,
    speculative_generate_step,
    stream_generate,
)
from reference.dummy import STANDARD_PROMPTS

CAPITAL_OF_FRANCE = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(
    scope="module", params=["dummy", pytest.param("smollm2-135m", marks=pytest.mark.smollm)]
)
def engine(request, loaded_models):
    """(name, model, tokenizer, prompt ids) for each model under test."""
    model, tokenizer = loaded_models(request.param)
    # Short raw prompts: prefill on the CPU runs at only ~10 tokens/s for smollm2.
    text = STANDARD_PROMPTS[2] if request.param == "dummy" else "The capital of France is"
    prompt = tokenizer.encode(text)
    return request.param, model, tokenizer, prompt


def chat_prompt(tokenizer, message: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True
    )


def greedy(model, prompt, max_tokens, **kwargs) -> list[int]:
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs)]


@pytest.mark.smollm
def test_smollm_answers_capital_of_france(loaded_models):
    model, tokenizer = loaded_models("smollm2-135m")
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=32))
    assert [r.token for r in responses] == CAPITAL_OF_FRANCE
    assert "".join(r.text for r in responses) == "The capital of France is Paris."
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])


def test_generate_returns_the_decoded_reply(engine):
    _, model, tokenizer, prompt = engine
    text = generate(model, tokenizer, prompt, max_tokens=6)
    tokens = greedy(model, prompt, 6)
    eos = next((i for i, t in enumerate(tokens) if t in tokenizer.eos_token_ids), len(tokens))
    assert text == tokenizer.decode(tokens[:eos])
    assert text


def test_logit_bias_forces_a_token(engine):
    _, model, tokenizer, prompt = engine
    forced = tokenizer.encode("x", add_special_tokens=False)[0]
    processors = make_logits_processors(logit_bias={forced: 2000.0})
    responses = list(
        stream_generate(model, tokenizer, prompt, max_tokens=5, logits_processors=processors)
    )
    assert [r.token for r in responses] == [forced] * 5
    assert responses[-1].finish_reason == "length"


def test_stream_generate_yields_exactly_max_tokens(engine):
    _, model, tokenizer, prompt = engine
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=5))
    assert len(responses) == 5
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4, 5]
    assert responses[-1].finish_reason == "length"


def test_logits_processor_last_call_sees_prompt_plus_max_tokens(engine):
    _, model, tokenizer, prompt = engine
    seen_lengths = []

    def spy(tokens, logits):
        seen_lengths.append(len(tokens))
        return logits

    list(stream_generate(model, tokenizer, prompt, max_tokens=5, logits_processors=[spy]))
    assert seen_lengths[-1] == len(prompt) + 5
    # One call per decoding step, each seeing one more token than the one before.
    assert seen_lengths == list(range(len(prompt), len(prompt) + 6))


def test_speculative_from_draft_pattern(engine):
    _, model, tokenizer, prompt = engine
    responses = list(
        stream_generate(
            model, tokenizer, prompt, max_tokens=5, draft_model=model, num_draft_tokens=2
        )
    )
    assert [r.from_draft for r in responses] == [True, True, False, True, True]


@pytest.mark.parametrize("num_draft_tokens", [1, 2, 3, 4])
def test_speculative_greedy_equals_plain_greedy(engine, loaded_models, num_draft_tokens):
    name, model, _, prompt = engine
    max_tokens = 16 if name == "dummy" else 8
    expected = greedy(model, prompt, max_tokens)
    drafts = [model] + ([loaded_models("dummy-draft")[0]] if name == "dummy" else [])
    for draft in drafts:
        got = [
            t
            for t, _, _ in speculative_generate_step(
                mx.array(prompt),
                model,
                draft,
                num_draft_tokens=num_draft_tokens,
                max_tokens=max_tokens,
            )
        ]
        assert got == expected


def test_speculative_logprobs_equal_plain_logprobs(loaded_models):
    model, tokenizer = loaded_models("dummy")
    draft, _ = loaded_models("dummy-draft")
    prompt = mx.array(tokenizer.encode(STANDARD_PROMPTS[0]))
    plain = list(generate_step(prompt, model, max_tokens=12))
    spec = list(speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=12))
    assert len(spec) == 12
    for (t1, lp1), (t2, lp2, _) in zip(plain, spec):
        assert t1 == t2
        assert mx.abs(lp1 - lp2).max().item() < 1e-4


@pytest.mark.parametrize("prefill_step_size", [2048, 5])
def test_input_embeddings_equal_token_input(engine, prefill_step_size):
    name, model, _, prompt = engine
    max_tokens = 8 if name == "dummy" else 4
    expected = greedy(model, prompt, max_tokens)
    embeddings = model.model.embed_tokens(mx.array(prompt))
    calls = []
    got = greedy(
        model,
        [],
        max_tokens,
        input_embeddings=embeddings,
        prefill_step_size=prefill_step_size,
        prompt_progress_callback=lambda done, total: calls.append((done, total)),
    )
    assert got == expected
    # Embeddings together with their tokens give the same as well.
    assert greedy(model, prompt, max_tokens, input_embeddings=embeddings) == expected
    assert calls[0] == (0, len(prompt)) and calls[-1] == (len(prompt), len(prompt))
    if prefill_step_size == 5:
        assert len(calls) > len(prompt) / 5


def test_prefill_chunk_size_does_not_change_output(loaded_models):
    model, tokenizer = loaded_models("dummy")
    prompt = tokenizer.encode(" ".join(STANDARD_PROMPTS))
    expected = list(generate_step(mx.array(prompt), model, max_tokens=8))
    for step in (1, 3, 7, 64):
        got = list(generate_step(mx.array(prompt), model, max_tokens=8, prefill_step_size=step))
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            assert mx.abs(a - b).max().item() < 1e-4


def test_rotating_cache_output_is_chunk_independent(loaded_models):
    model, tokenizer = loaded_models("dummy")
    prompt = tokenizer.encode(" ".join(STANDARD_PROMPTS))[:24]  # three times a window of 8
    runs = {
        step: list(
            generate_step(
                mx.array(prompt), model, max_tokens=8, max_kv_size=8, prefill_step_size=step
            )
        )
        for step in (1, 3, 8, 2048)
    }
    expected = runs[2048]
    for run in runs.values():
        assert [t for t, _ in run] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(run, expected):
            assert mx.abs(a - b).max().item() < 1e-4
    # The window really limits attention: a full cache gives other logprobs.
    full = list(generate_step(mx.array(prompt), model, max_tokens=1))
    assert mx.abs(full[0][1] - expected[0][1]).max().item() > 1e-3


def test_finish_reason_stop_on_eos_and_eos_token_reported(loaded_models):
    model, tokenizer = loaded_models("dummy")
    eos = min(tokenizer.eos_token_ids)
    processors = make_logits_processors(logit_bias={eos: 2000.0})
    responses = list(
        stream_generate(
            model, tokenizer, STANDARD_PROMPTS[0], max_tokens=8, logits_processors=processors
        )
    )
    assert len(responses) == 1
    assert responses[0].token == eos and responses[0].finish_reason == "stop"
    assert responses[0].text == ""


def test_same_seed_same_samples(loaded_models):
    from reference import make_sampler

    model, tokenizer = loaded_models("dummy")
    sampler = make_sampler(temp=1.0, top_k=20)

    def draw(seed):
        mx.random.seed(seed)
        return greedy(model, tokenizer.encode(STANDARD_PROMPTS[1]), 12, sampler=sampler)

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.fixture
def dummy_prompt(loaded_models):
    model, tokenizer = loaded_models("dummy")
    return model, tokenizer, tokenizer.encode(STANDARD_PROMPTS[3])


def test_bad_inputs_raise_clear_errors_and_leave_cache_untouched(dummy_prompt, loaded_models):
    model, tokenizer, prompt = dummy_prompt
    cache = make_prompt_cache(model)
    vocab = model.args.vocab_size
    cases = [
        ({"prompt": []}, "prompt is empty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"prompt": prompt + [vocab]}, f"outside the vocabulary \\[0, {vocab}\\)"),
        ({"prompt": [-1]}, "outside the vocabulary"),
        (
            {"prompt": [], "input_embeddings": mx.zeros((3, model.args.hidden_size + 1))},
            "input_embeddings must have shape",
        ),
        (
            {"input_embeddings": mx.zeros((len(prompt) + 1, model.args.hidden_size))},
            "positions but the prompt has",
        ),
        ({"prefill_step_size": 0}, "prefill_step_size"),
    ]
    for overrides, message in cases:
        kwargs = {"prompt": prompt, "max_tokens": 4, "prompt_cache": cache} | overrides
        with pytest.raises(ValueError, match=message):
            list(stream_generate(model, tokenizer, **kwargs))
        assert all(c.offset == 0 and c.keys is None for c in cache)
    # The generator is still usable afterwards.
    assert len(list(stream_generate(model, tokenizer, prompt, max_tokens=3))) == 3


@pytest.mark.smollm
def test_draft_with_other_vocabulary_is_rejected(dummy_prompt, loaded_models):
    model, tokenizer, prompt = dummy_prompt
    smollm, _ = loaded_models("smollm2-135m")
    with pytest.raises(ValueError, match="vocabulary size"):
        list(stream_generate(model, tokenizer, prompt, max_tokens=3, draft_model=smollm))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        list(speculative_generate_step(mx.array(prompt), model, model, num_draft_tokens=0))


def test_load_unknown_name_lists_builtins():
    with pytest.raises((ValueError, OSError), match="dummy"):
        load("no-such-model-here")
