"""The reference engine (package ``reference``) as an engine under test.

It is driven through the same mlx-lm-style calls as mlx-lm itself (see
``mlx_style.py``), so running the suite on it checks that the reference keeps
its own promises: stream equals non-stream, batch equals single, and so on.
It also serves the suite as the *oracle*: tokenizer, embeddings, answers.
"""

from __future__ import annotations

from types import SimpleNamespace

# The reference first: it binds OpenBLAS under MLX's float32 matmuls, which only works
# before mlx.core is loaded (reference/blas.py); this adapter may be a process's first import.
# isort: off
import reference
import mlx.core as mx
# isort: on
import numpy as np

from engines.adapters.mlx_style import ALL_BUT_BATCH, MlxStyleEngine
from engines.protocol import BadRequest, request_problem


class ReferenceEngine(MlxStyleEngine):
    name = "reference"
    model_formats = ("builtin",)
    capabilities = ALL_BUT_BATCH | {"batch"}
    api = SimpleNamespace(
        stream_generate=reference.stream_generate,
        generate_step=reference.generate_step,
        speculative_generate_step=reference.speculative_generate_step,
        BatchGenerator=reference.BatchGenerator,
        make_sampler=reference.make_sampler,
        make_logits_processors=reference.make_logits_processors,
        make_prompt_cache=reference.make_prompt_cache,
        trim_prompt_cache=reference.trim_prompt_cache,
        can_trim_prompt_cache=reference.can_trim_prompt_cache,
    )

    def load(self, source):
        return reference.load(source.name)

    def generate(self, request):
        self.refuse_invalid(request)
        yield from super().generate(request)

    def generate_batch(self, request):
        for row in request.rows:
            self.refuse_invalid(row.request)
        return super().generate_batch(request)

    def refuse_invalid(self, request) -> None:
        """PROTOCOL.md S6: an invalid request is refused, never served in some way."""
        problem = request_problem(request, self.vocab_size)
        if problem is not None:
            raise BadRequest(problem)

    def load_draft(self, name: str):
        return reference.load(name)[0]

    def embed(self, tokens: list[int]) -> np.ndarray:
        """The model's input embeddings of ``tokens`` (positions x hidden), as float32."""
        vectors = self.model.model.embed_tokens(mx.array(tokens, dtype=mx.int32))
        return np.array(vectors.astype(mx.float32))

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "version": "lmconform reference",
            "model": self.source.describe(),
        }
