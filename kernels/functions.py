"""Public functions over effnb's quantized linear ops: check the arguments, then call ``torch.ops.effnb.*``.

    int4_linear(x, qweight, scales, zeros, group_size, bias=None)
    int8_linear(x, qweight, scales, group_size, bias=None)
    nf4_linear(x, qweight, absmax, blocksize, shape, bias=None)      absmax: fp32 tensor or DoubleQuant
    fp4_linear(x, qweight, absmax, blocksize, shape, bias=None)

Each returns y = x @ W.T + bias for x [..., K] (fp16, bf16 or fp32) in x's dtype, with W in the
canonical layout (``reference.py``): nothing is repacked, so what is saved is what runs. Which
implementation runs (C++ on CPU, Triton on CUDA, the reference elsewhere) is ``ops.py``'s choice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops  # noqa: F401  (declares the torch.ops.effnb.* ops)

__all__ = ["int4_linear", "int8_linear", "nf4_linear", "fp4_linear", "DoubleQuant"]
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class DoubleQuant(NamedTuple):
    """bitsandbytes' compressed absmax (``compress_statistics``): absmax = code2[qabsmax] * absmax2 + offset."""

    qabsmax: torch.Tensor  # uint8 [blocks]
    absmax2: torch.Tensor  # fp32 [ceil(blocks / 256)]
    code2: torch.Tensor  # fp32 [256]
    offset: torch.Tensor  # fp32 [1]



def _check_x(x: torch.Tensor, k: int, what: str) -> None:
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"{what}: activations of dtype {x.dtype} are not supported; use float16, bfloat16 or float32")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} features in its last dimension, the weight expects {k}")


def int4_linear(x, qweight, scales, zeros, group_size, bias=None):
    """y = x @ W.T + bias, W int4 (formats.quantize_int4 layout; zeros None = symmetric)."""
    _check_x(x, qweight.shape[1] * 2, "int4_linear")
    return torch.ops.effnb.int4_linear(x, qweight, scales, zeros, int(group_size), bias)


def int8_linear(x, qweight, scales, group_size, bias=None):
    """y = x @ W.T + bias, W int8 [N, K] with fp16 scales [N, K/g]."""
    _check_x(x, qweight.shape[1], "int8_linear")
    return torch.ops.effnb.int8_linear(x, qweight, scales, int(group_size), bias)


def _lut4(quant_type, x, qweight, absmax, blocksize, shape, bias):
    n, k = (int(s) for s in shape)
    _check_x(x, k, f"{quant_type}_linear")
    if isinstance(absmax, DoubleQuant) or (isinstance(absmax, tuple) and len(absmax) == 4):
        q, a2, c2, off = absmax
        return torch.ops.effnb.lut4_dq_linear(x, qweight, q, a2, c2, off.reshape(1).float(), quant_type,
                                              int(blocksize), n, k, bias)
    return torch.ops.effnb.lut4_linear(x, qweight, absmax, quant_type, int(blocksize), n, k, bias)


def nf4_linear(x, qweight, absmax, blocksize, shape, bias=None):
    """y = x @ W.T + bias, W NF4 in bitsandbytes' layout; ``absmax`` fp32 or a DoubleQuant."""
    return _lut4("nf4", x, qweight, absmax, blocksize, shape, bias)


def fp4_linear(x, qweight, absmax, blocksize, shape, bias=None):
    """y = x @ W.T + bias, W FP4 in bitsandbytes' layout; ``absmax`` fp32 or a DoubleQuant."""
    return _lut4("fp4", x, qweight, absmax, blocksize, shape, bias)
