"""Loading and exporting models: built-in dummies, the SmolLM2 GGUF, folders, Hub ids, the CLI."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lmconform.cli import main as cli_main
from reference.dummy import (
    CHAT_TEMPLATE,
    END_OF_TEXT_ID,
    EOS_TOKEN_IDS,
    IM_END_ID,
    STANDARD_PROMPTS,
    VOCAB_SIZE,
)
from reference.gguf import unpermute_rows
from reference.loading import BUILTIN_MODELS, load, smollm2_gguf_path

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "A café in Paris"
THE = 504  # SmolLM2's first reply token to CHAT: "The" (capital of France is Paris.)


def chat_ids(tokenizer, messages=CHAT) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )


def logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def weights(model) -> dict[str, np.ndarray]:
    return {name: np.array(value) for name, value in tree_flatten(model.parameters())}


def greedy_margins(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with plain full forward passes (no cache), and the top-1/top-2
    log-probability margin at each step."""
    tokens, margins = [], []
    for _ in range(steps):
        step = model(mx.array([ids + tokens]))[0, -1]
        logprobs = np.sort(np.array(step - mx.logsumexp(step)))[::-1]
        margins.append(float(logprobs[0] - logprobs[1]))
        tokens.append(int(mx.argmax(step)))
    return tokens, margins


# --- the dummy models ----------------------------------------------------------------------


def test_dummy_loads_are_bit_identical():
    first, second = weights(load("dummy")[0]), weights(load("dummy")[0])
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == np.float32, name
        assert np.array_equal(first[name], second[name]), name


def test_dummy_architecture(dummy):
    model, _ = dummy
    args = model.args
    assert args.num_hidden_layers == 2 == len(model.layers)
    assert args.num_key_value_heads < args.num_attention_heads  # grouped-query attention
    assert not args.tie_word_embeddings and "lm_head.weight" in weights(model)
    assert args.vocab_size == VOCAB_SIZE == 256 + 4  # bytes, then the special tokens


@pytest.mark.parametrize("name", ["dummy", "dummy-draft"])
def test_dummy_greedy_is_well_conditioned(name, loaded_models):
    """Two correct engines must not disagree on greedy tokens by rounding alone."""
    model, tokenizer = loaded_models(name)
    all_margins = []
    for prompt in STANDARD_PROMPTS:
        tokens, margins = greedy_margins(model, tokenizer.encode(prompt), steps=16)
        assert tokens[0] not in tokenizer.eos_token_ids, f"{prompt!r} ends at once"
        all_margins += margins
    assert np.median(all_margins) >= 0.5


def test_dummy_draft_shares_the_vocabulary_not_the_layers(dummy, dummy_draft):
    (model, tokenizer), (draft, draft_tokenizer) = dummy, dummy_draft
    assert len(draft.layers) == 1
    assert draft.args.vocab_size == model.args.vocab_size
    assert draft_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert draft_tokenizer.eos_token_ids == tokenizer.eos_token_ids
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(weights(model)[layer], weights(draft)[layer])


def test_dummy_draft_often_predicts_the_dummy_token(dummy, dummy_draft):
    """Speculative decoding needs drafts that are sometimes accepted, sometimes not."""
    (model, tokenizer), (draft, _) = dummy, dummy_draft
    agree = total = 0
    for prompt in STANDARD_PROMPTS:
        ids = tokenizer.encode(prompt)
        tokens, _ = greedy_margins(model, ids, steps=8)
        for n in range(len(tokens)):
            context = mx.array([ids + tokens[:n]])
            agree += int(mx.argmax(draft(context)[0, -1])) == tokens[n]
            total += 1
    assert 0.15 <= agree / total <= 0.85


def test_dummy_tokenizer_is_byte_level_with_specials(dummy):
    _, tokenizer = dummy
    assert tokenizer.encode("Hi") == [ord("H"), ord("i")]
    assert tokenizer.encode("café") == list("café".encode())  # "é" is two tokens
    assert tokenizer.decode(tokenizer.encode("A café in Paris")) == "A café in Paris"
    assert tokenizer.encode("<|im_end|>") == [IM_END_ID]
    assert tokenizer.eos_token_ids == {IM_END_ID, END_OF_TEXT_ID}
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_ids(tokenizer) == tokenizer.encode(text)


def test_load_options_follow_mlx_lm():
    assert len(load("dummy")) == 2
    _, _, config = load("dummy", return_config=True)
    assert config["num_hidden_layers"] == 2 and config["eos_token_id"] == EOS_TOKEN_IDS
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, custom = load("dummy", tokenizer_config={"chat_template": template})
    assert custom.apply_chat_template(CHAT, tokenize=False) == CHAT[0]["content"]
    ids = custom.encode(PROMPT)
    other, _, other_config = load("dummy", model_config={"rope_theta": 50.0}, return_config=True)
    assert other_config["rope_theta"] == 50.0
    assert not np.allclose(logits(other, ids), logits(load("dummy")[0], ids), atol=1e-3)
    # Changing the architecture leaves weights unused: a strict load refuses, as in mlx-lm.
    with pytest.raises(ValueError, match="layers.1"):
        load("dummy", model_config={"num_hidden_layers": 1})


def test_unknown_name_lists_the_builtin_models():
    with pytest.raises(ValueError) as error:
        load("no-such-model")
    for name in BUILTIN_MODELS:
        assert name in str(error.value)


# --- SmolLM2 from GGUF -------------------------------------------------------------------


def test_gguf_row_permutation_is_undone():
    """llama.cpp's converter interleaves the two halves of each head's rows; we undo it."""
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(-1, cols)
    llama_cpp = hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(llama_cpp, hf)
    assert np.array_equal(np.array(unpermute_rows(mx.array(llama_cpp), n_heads)), hf)


@pytest.mark.smollm
def test_smollm_tokenizer_equals_transformers_gguf_tokenizer(smollm):
    from transformers import AutoTokenizer

    _, tokenizer = smollm
    path = smollm2_gguf_path()
    expected = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        "What is the capital of France?",
        "  Café naïve, 你好! 12345\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        assert tokenizer.encode(text) == expected.encode(text), text
    assert chat_ids(tokenizer) == chat_ids(expected)
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.decode(tokenizer.encode(texts[1])) == texts[1]


@pytest.mark.smollm
def test_smollm_first_greedy_token_is_the(smollm):
    model, tokenizer = smollm
    assert model.args.num_hidden_layers == 30 and model.args.tie_word_embeddings
    assert int(np.argmax(logits(model, chat_ids(tokenizer))[-1])) == THE


@pytest.mark.parametrize("keep_bytes", [1_000_000, 60_000_000])
def test_truncated_gguf_error_names_the_file(tmp_path, keep_bytes):
    broken = tmp_path / "broken.gguf"
    with open(smollm2_gguf_path(), "rb") as source:
        broken.write_bytes(source.read(keep_bytes))
    with pytest.raises(ValueError, match="broken.gguf"):
        load(str(broken))


def test_missing_gguf_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load(str(tmp_path / "absent.gguf"))


# --- export and Hugging Face folders -------------------------------------------------------


def test_exported_dummy_folder_is_standard(exported_dummy_dir):
    names = {path.name for path in exported_dummy_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    } <= names
    config = json.loads((exported_dummy_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32" and "quantization" not in config
    generation = json.loads((exported_dummy_dir / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(EOS_TOKEN_IDS)
    tokenizer_config = json.loads((exported_dummy_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE


def test_exported_dummy_reloads_identically(dummy, exported_dummy_dir):
    model, tokenizer = dummy
    reloaded, reloaded_tokenizer = load(str(exported_dummy_dir))
    ids = tokenizer.encode(PROMPT)
    assert np.array_equal(logits(reloaded, ids), logits(model, ids))
    assert reloaded_tokenizer.encode(PROMPT) == ids
    assert chat_ids(reloaded_tokenizer) == chat_ids(tokenizer)
    assert reloaded_tokenizer.eos_token_ids == tokenizer.eos_token_ids


@pytest.mark.peer
def test_exported_dummy_loads_in_transformers(dummy, exported_dummy_dir):
    torch = pytest.importorskip("torch", reason="peer torch not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = dummy
    ids = tokenizer.encode(PROMPT)
    peer = AutoModelForCausalLM.from_pretrained(str(exported_dummy_dir)).eval()
    with torch.no_grad():
        peer_logits = peer(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(peer_logits, logits(model, ids), atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(str(exported_dummy_dir)).encode(PROMPT) == ids


@pytest.mark.peer
def test_exported_dummy_loads_in_mlx_lm(dummy, exported_dummy_dir):
    mlx_lm = pytest.importorskip("mlx_lm", reason="peer mlx-lm not installed")
    model, tokenizer = dummy
    peer, peer_tokenizer = mlx_lm.load(str(exported_dummy_dir))
    ids = tokenizer.encode(PROMPT)
    np.testing.assert_allclose(logits(peer, ids), logits(model, ids), atol=1e-4, rtol=0)
    assert set(peer_tokenizer.eos_token_ids) == tokenizer.eos_token_ids


@pytest.mark.smollm
@pytest.mark.peer
def test_exported_smollm_loads_in_mlx_lm_and_reference(smollm, exported_smollm_dir):
    mlx_lm = pytest.importorskip("mlx_lm", reason="peer mlx-lm not installed")
    model, tokenizer = smollm
    config = json.loads((exported_smollm_dir / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    ids = chat_ids(tokenizer)[-12:]  # a short prompt keeps the CPU time down
    expected = logits(model, ids)
    peer, peer_tokenizer = mlx_lm.load(str(exported_smollm_dir))
    np.testing.assert_allclose(logits(peer, ids), expected, atol=1e-2, rtol=0)
    assert peer_tokenizer.encode("What is the capital of France?") == tokenizer.encode(
        "What is the capital of France?"
    )
    reloaded, reloaded_tokenizer = load(str(exported_smollm_dir))
    assert np.array_equal(logits(reloaded, ids), expected)
    assert chat_ids(reloaded_tokenizer) == chat_ids(tokenizer)


def test_sharded_folder_loads(dummy, exported_dummy_dir, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(exported_dummy_dir, folder)
    (folder / "model.safetensors").unlink()
    all_weights = dict(tree_flatten(dummy[0].parameters()))
    names = sorted(all_weights)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, shard_names in shards.items():
        mx.save_safetensors(str(folder / file), {n: all_weights[n] for n in shard_names})
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = dummy[1].encode(PROMPT)
    assert np.array_equal(logits(load(str(folder))[0], ids), logits(dummy[0], ids))


def test_truncated_safetensors_error_names_the_file(exported_dummy_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(exported_dummy_dir, folder)
    weights_file = folder / "model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError), match=str(weights_file)):
        load(str(folder))


def test_folder_without_weights_is_reported(exported_dummy_dir, tmp_path):
    folder = tmp_path / "no_weights"
    shutil.copytree(exported_dummy_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_weights"):
        load(str(folder))


# --- Hub ids -------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(exported_dummy_dir, tmp_path, monkeypatch):
    """A Hugging Face Hub cache holding ``lmconform-test/dummy`` (the exported dummy), offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--lmconform-test--dummy"
    shutil.copytree(exported_dummy_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_local_cache(dummy, hub_cache):
    model, tokenizer = dummy
    ids = tokenizer.encode(PROMPT)
    for revision in (None, COMMIT):
        hub_model, hub_tokenizer = load("lmconform-test/dummy", revision=revision)
        assert np.array_equal(logits(hub_model, ids), logits(model, ids))
        assert hub_tokenizer.eos_token_ids == tokenizer.eos_token_ids


def test_hub_id_not_in_cache_is_a_clear_error(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        load("lmconform-test/absent")
    message = str(error.value)
    assert "lmconform-test/absent" in message and str(hub_cache) in message


# --- the command line ------------------------------------------------------------------------


def test_cli_models_list(capsys):
    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN_MODELS:
        assert name in out


def test_cli_models_export(dummy, tmp_path, capsys):
    out_dir = tmp_path / "cli_dummy"
    assert cli_main(["models", "export", "dummy", str(out_dir)]) == 0
    ids = dummy[1].encode(PROMPT)
    assert np.array_equal(logits(load(str(out_dir))[0], ids), logits(dummy[0], ids))
    assert cli_main(["models", "export", "no-such-model", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "dummy" in err and "Traceback" not in err
