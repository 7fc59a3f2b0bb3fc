"""mlx-lm (pinned 0.32.2) as an engine under test, loading the exported Hugging Face folder."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

# isort: off
import reference  # noqa: F401  (first: its BLAS under mlx.core, see engines/adapters/mlx_style.py)
import mlx_lm
# isort: on
from mlx_lm import sample_utils
from mlx_lm.models import cache as mlx_cache
from mlx_lm.utils import does_model_support_input_embeddings

from engines.adapters.mlx_style import ALL_BUT_BATCH, MlxStyleEngine
from engines.models import resolve
from engines.protocol import Unsupported

# The module, not the function of the same name that mlx_lm's __init__ exports.
mlx_generate = importlib.import_module("mlx_lm.generate")


class MlxLmEngine(MlxStyleEngine):
    name = "mlx-lm"
    model_formats = ("hf-folder",)
    capabilities = ALL_BUT_BATCH | {"batch"}
    api = SimpleNamespace(
        stream_generate=mlx_generate.stream_generate,
        generate_step=mlx_generate.generate_step,
        speculative_generate_step=mlx_generate.speculative_generate_step,
        BatchGenerator=mlx_generate.BatchGenerator,
        make_sampler=sample_utils.make_sampler,
        make_logits_processors=sample_utils.make_logits_processors,
        make_prompt_cache=mlx_cache.make_prompt_cache,
        trim_prompt_cache=mlx_cache.trim_prompt_cache,
        can_trim_prompt_cache=mlx_cache.can_trim_prompt_cache,
    )

    def load(self, source):
        return mlx_lm.load(str(source.path))

    def load_draft(self, name: str):
        return mlx_lm.load(str(resolve(name, self.model_formats).path))[0]

    def generate(self, request):
        # Some of mlx-lm's model families (gemma2, phi3, qwen2_moe in 0.32.2) take no input
        # embeddings: a limit of the model, so the case is unsupported rather than failed.
        if request.prompt_embeddings is not None and not does_model_support_input_embeddings(
            self.model
        ):
            raise Unsupported(f"mlx-lm's {self.model.model_type} model takes no input embeddings")
        return super().generate(request)

    def rotating_cache(self, max_kv_size: int) -> list:
        # mlx-lm's make_prompt_cache ignores max_kv_size for models that have their own
        # make_cache (its Llama does), so build the bounded cache as an mlx-lm user must.
        return [mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=4) for _ in self.model.layers]

    def describe(self) -> dict:
        version = getattr(mlx_lm, "__version__", "unknown")
        return {
            "engine": self.name,
            "version": f"mlx-lm {version}",
            "model": self.source.describe(),
        }
