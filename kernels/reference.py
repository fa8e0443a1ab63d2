"""Pure-PyTorch references: dequantize the canonical layout to fp32, then one matmul.

These define what every kernel must compute (tests compare against them) and are the CPU
implementation of the ``effnb::*`` custom ops. The layouts are those of ``effnb.quant.formats``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effnb.quant import formats


def dequantize(fmt: str, qweight: torch.Tensor, *, n: int, k: int, group: int, scales=None, zeros=None,
               absmax=None, dq=None) -> torch.Tensor:
    """W [n, k] in fp32 from the canonical tensors (``dq`` = (qabsmax, absmax2, code2, offset))."""
    if fmt == "int4":
        return formats.dequantize_int4(qweight, scales, zeros, group)
    if fmt == "int8":
        return formats.dequantize_int8(qweight, scales, group)
    if fmt in ("nf4", "fp4"):
        if dq is not None:
            absmax = formats.undo_double_quant(*dq)
        return formats.dequantize_4bit(qweight, absmax, group, fmt, (n, k))
    raise ValueError(f"unknown format {fmt!r}; expected one of int4, int8, nf4, fp4")


def reference_linear(fmt: str, x: torch.Tensor, qweight: torch.Tensor, *, n: int, k: int, group: int,
                     scales=None, zeros=None, absmax=None, dq=None, bias=None) -> torch.Tensor:
    """y = x @ W.T + bias computed in fp32 (float64 for float64 x), returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize(fmt, qweight, n=n, k=k, group=group, scales=scales, zeros=zeros, absmax=absmax, dq=dq)
    b = bias.to(acc) if bias is not None else None
    return F.linear(x.to(acc), w.to(device=x.device, dtype=acc), b).to(x.dtype)
