"""The reference generation engine: compact, readable, mlx-lm-compatible.

Where to find things:

- models/              the model families, one module each (llama.py holds the shared
                       blocks; qwen, gemma, phi3, moe); picked by config's model_type
- model.py             the Llama model at its historical import path
- kv_cache.py          KVCache, RotatingKVCache, prompt-cache save/load/trim
- prefill.py           chunked prompt processing
- sampler.py           temperature, top-k, top-p, min-p sampling
- logits_processors.py logit bias and repetition/presence/frequency penalties
- generate.py          generate_step, stream_generate, generate
- speculative.py       speculative decoding with a draft model
- batch.py             the batch scheduler: BatchGenerator, batch_generate
- batch_cache.py       the batched KV cache (left padding, per-row positions)
- tokenizer.py         tokenizer wrapper and the streaming detokenizer
- loading.py           load(): built-in models, HF folders, GGUF files, Hub ids
- dummy.py, gguf.py    the built-in tiny models (one per family); the GGUF reader
- export.py            write a model as a standard Hugging Face folder
- blas.py              OpenBLAS under MLX's float32 matmuls (loaded before mlx.core)
- fast_path.py         the fast path: quantized weights de-quantized once, at load
"""

from . import blas

# Before anything imports mlx.core: its BLAS symbols are bound when it is loaded.
blas.install()

from .batch import BatchGenerator, BatchResponse, batch_generate
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .kv_cache import (
    KVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from .loading import load
from .logits_processors import make_logits_processors
from .sampler import make_sampler
from .speculative import speculative_generate_step

__all__ = [
    "BatchGenerator",
    "BatchResponse",
    "GenerationResponse",
    "KVCache",
    "RotatingKVCache",
    "batch_generate",
    "can_trim_prompt_cache",
    "generate",
    "generate_step",
    "load",
    "load_prompt_cache",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "speculative_generate_step",
    "stream_generate",
    "trim_prompt_cache",
]
