"""The fast path: quantized weights de-quantized to float32 once, at load.

MLX's CPU quantized matmul runs at about 1 GMAC/s on one thread, for a prompt
of 128 tokens as for one token, so quantized models prefill as slowly per token
as they decode. Float32 products go to BLAS (OpenBLAS, see ``blas.py``): a
multi-row product (prefill, a batch) is compute-bound there and some 10x faster,
and a one-row product (a decode step) goes to sgemv, which streams the weights at
memory speed. Measured on smollm2-135m, float32 beat the quantized kernel on both
(README, "The reference engine"), so every quantized layer is replaced; nothing
keeps its quantized copy.

The de-quantized weights are the values the quantized kernel multiplies by
(``scale * q + bias``, computed in float32), so the two paths differ only in the
order of float32 additions. Without an optimized BLAS the float products are
slower than the quantized kernel, so ``load`` applies this only where
``blas.install()`` succeeded.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized layer of ``model`` by its float32 equivalent, in place.

    Returns how many layers were replaced (0 for a float model, left untouched).
    """
    replaced = [
        (path, float_layer(module))
        for path, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        and module.mode == "affine"  # the layout every loader here produces
    ]
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def float_layer(module: nn.QuantizedLinear | nn.QuantizedEmbedding) -> nn.Module:
    """The float32 ``Linear`` or ``Embedding`` that computes what ``module`` computes."""
    weight = dequantized_weight(module)
    rows, columns = weight.shape
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(rows, columns)
    else:
        layer = nn.Linear(columns, rows, bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    return layer


def dequantized_weight(module: nn.QuantizedLinear | nn.QuantizedEmbedding) -> mx.array:
    # Scales and biases may be stored in float16; in float16 `scale * q + bias`
    # would round to 11 bits, while the quantized kernel computes it in float32.
    return mx.dequantize(
        module.weight,
        module.scales.astype(mx.float32),
        module.biases.astype(mx.float32),
        group_size=module.group_size,
        bits=module.bits,
    )
