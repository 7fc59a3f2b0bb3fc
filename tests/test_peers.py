"""Cross-engine agreement: the reference against mlx-lm and transformers on the same weights.

The exported dummy (fp32) must give the same greedy tokens in all three engines,
with chosen-token logprobs within 1e-4. On smollm2-135m (Q4_1, exported as an
MLX-quantized folder) the reference and mlx-lm must give the same tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from reference import generate_step
from reference.dummy import STANDARD_PROMPTS

mlx_lm = pytest.importorskip(
    "mlx_lm", reason="peer mlx-lm not installed: pip install 'lmconform[peers]'"
)
SMOLLM_PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
]


def reference_greedy(model, prompt, max_tokens):
    steps = list(generate_step(mx.array(prompt), model, max_tokens=max_tokens))
    return [t for t, _ in steps], [lp[t].item() for t, lp in steps]


def mlx_lm_greedy(model, prompt, max_tokens):
    from mlx_lm.generate import generate_step as peer_step

    steps = list(peer_step(mx.array(prompt), model, max_tokens=max_tokens))
    return [t for t, _ in steps], [lp[t].item() for t, lp in steps]


def transformers_greedy(model, prompt, max_tokens):
    import torch

    tokens, logprobs = [], []
    ids = torch.tensor([prompt])
    past = None
    with torch.no_grad():
        for _ in range(max_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            ids = torch.tensor([[token]])
    return tokens, logprobs


@pytest.fixture(scope="module")
def dummy_peers(loaded_models, exported_dummy_dir):
    model, tokenizer = loaded_models("dummy")
    prompts = [tokenizer.encode(p) for p in STANDARD_PROMPTS[:6]]
    return model, prompts, exported_dummy_dir


@pytest.mark.peer
def test_dummy_greedy_equals_mlx_lm(dummy_peers):
    model, prompts, folder = dummy_peers
    peer, _ = mlx_lm.load(str(folder))
    for prompt in prompts:
        ours, our_lps = reference_greedy(model, prompt, 16)
        theirs, their_lps = mlx_lm_greedy(peer, prompt, 16)
        assert ours == theirs
        np.testing.assert_allclose(our_lps, their_lps, atol=1e-4)


@pytest.mark.peer
def test_dummy_greedy_equals_transformers(dummy_peers):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip(
        "torch", reason="PyTorch peer not installed: pip install 'lmconform[peers]'"
    )
    model, prompts, folder = dummy_peers
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    peer.eval()
    for prompt in prompts:
        ours, our_lps = reference_greedy(model, prompt, 16)
        theirs, their_lps = transformers_greedy(peer, prompt, 16)
        assert ours == theirs
        np.testing.assert_allclose(our_lps, their_lps, atol=1e-4)


@pytest.mark.peer
@pytest.mark.smollm
def test_smollm_greedy_equals_mlx_lm(loaded_models, exported_smollm_dir):
    model, tokenizer = loaded_models("smollm2-135m")
    peer, _ = mlx_lm.load(str(exported_smollm_dir))
    for message in SMOLLM_PROMPTS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True
        )
        ours, _ = reference_greedy(model, prompt, 16)
        theirs, _ = mlx_lm_greedy(peer, prompt, 16)
        assert ours == theirs, message
