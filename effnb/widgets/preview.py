"""The quantization preview behind ``QuantExplorer``: one weight quantized in the storage formats
``effnb.quantize`` writes (the Format table of ``effnb.kernels.formats``), or at any bits with a
min/max grid, with the grid of its widest group and the bytes as stored."""

from __future__ import annotations

import math

BITS_RANGE = (2, 8)
GROUP_CHOICES = (32, 64, 128, 256, 0)  # 0 = one scale per output channel
HIST_BINS = 80
#: the preview-only method: round to nearest at any bits of BITS_RANGE (no format stores most widths)
ANY_BITS = "int"


def _methods() -> dict:
    """method -> bits (None: any of BITS_RANGE): ``ANY_BITS`` and every storage format, in the table's order."""
    from ..kernels.formats import FORMATS

    return {ANY_BITS: None, **{name: f.bits for name, f in FORMATS.items()}}


#: method -> bits (None: any of BITS_RANGE)
METHODS = _methods()


def group_label(g: int) -> str:
    return "per channel" if g == 0 else str(g)


def weight_nk(m):
    """fp32 [out, in] copy of the layer's weight (transformers' Conv1D stores [in, out])."""
    import torch

    w = m.weight.detach()
    if not isinstance(m, torch.nn.Linear):
        w = w.t()
    return w.float().clone()


def stored_format(method: str, bits: int):
    """The storage format the preview quantizes with; for ``ANY_BITS``, the zero-point format of those
    bits (int4 at 4), whose min/max grid is the one ``_any_bits`` computes; None when none stores them."""
    from ..kernels.formats import FORMATS

    if METHODS[method] is not None:
        return FORMATS[method]
    return next((f for f in FORMATS.values() if "zeros" in f.buffers and f.bits == bits), None)


def _grid(fmt, t: dict):
    """The values the group with the widest scale can take, from the format's own description."""
    import torch

    if fmt.grouping == "flat":  # bitsandbytes: a 16-entry table times each block's absmax
        return torch.tensor(fmt.table, dtype=torch.float32) * t["absmax"].max()
    scales = t["scales"].float().reshape(-1)
    if "zeros" in fmt.buffers:
        i = int(scales.argmax())
        z = t["zeros"].float().reshape(-1)[i]
        return (torch.arange(2 ** fmt.bits, dtype=torch.float32) - z) * scales[i]
    code_dtype = getattr(torch, fmt.code_dtype)
    if code_dtype.is_floating_point:  # every finite value of the 8-bit float code
        codes = torch.arange(2 ** fmt.bits, dtype=torch.uint8).view(code_dtype).float()
        return codes[torch.isfinite(codes)].unique() * scales.max()
    top = 2 ** (fmt.bits - 1) - 1  # symmetric integer codes, -top..top
    return torch.arange(-top, top + 1, dtype=torch.float32) * scales.max()


def _any_bits(w, bits: int, g: int):
    """Round to nearest at any ``bits``: asymmetric min/max grid per group, scale and zero in fp16 (as
    int4 stores them); the preview of widths effnb.quantize does not store."""
    import torch

    n, k = w.shape
    levels = 2 ** bits - 1
    wg = w.reshape(n, k // g, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).clamp(min=1e-12).half().float()
    z = (-lo / s).half().float()
    q = torch.round(wg / s + z).clamp_(0, levels)
    approx = ((q - z) * s).reshape(n, k)
    i = int(s.reshape(-1).argmax())
    grid = (torch.arange(levels + 1, dtype=torch.float32) - z.reshape(-1)[i]) * s.reshape(-1)[i]
    return approx, grid, math.ceil(n * k * bits / 8) + n * (k // g) * 4


def quantize_preview(w, method: str, bits: int, group_size: int):
    """(dequantized weight [N, K], grid of the widest group, bytes as stored) for one weight [N, K]."""
    n, k = w.shape
    fmt = stored_format(method, bits)
    g = group_size or k
    if fmt is None or fmt.grouping == "row":
        if k % g:
            raise ValueError(f"group size {g} does not divide this layer's {k} input features; pick one of "
                             f"{', '.join(str(x) for x in (32, 64, 128, 256) if k % x == 0) or 'per channel'}")
    if fmt is None:
        return _any_bits(w, bits, g)
    t = fmt.quantize(w, g)
    return fmt.dequantize(t, g, (n, k)), _grid(fmt, t), fmt.storage_bytes(n, k, g)
