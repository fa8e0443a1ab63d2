"""Round to nearest: weight [N, K] (fp32) -> the tensors of a storage format (``effnb.kernels.formats``).

Each format's reference quantizer is its ``Format.quantize``; where effnb's compiled CPU routines
apply (int4, int8, nf4, fp4 on a CPU with the library built) they give the same tensors, faster, plus
the squared error ("_sq_err") so the report's SNR needs no dequantization.
"""

from __future__ import annotations

import ctypes

import torch

from ..kernels import cpu
from ..kernels import reference as R
from ..kernels.formats import get_format

# The compiled routine's mode argument per format: (asymmetric, symmetric). The C ABI numbers them.
_COMPILED_MODES = {"int4": (0, 1), "int8": (2, 2)}


def cpu_library(w: torch.Tensor):
    """effnb's compiled CPU library when ``w`` is on the CPU and the library loads, else None (the
    PyTorch reference runs)."""
    if w.device.type != "cpu":
        return None
    return cpu.library(quiet=True)


def rtn(w: torch.Tensor, fmt: str, group_size: int, *, symmetric: bool = False, double_quant: bool = False) -> dict:
    """Round-to-nearest tensors for ``fmt`` (group_size 0 = per output channel)."""
    g = group_size or w.shape[1]
    if fmt in _COMPILED_MODES:
        fast = rtn_compiled(w, fmt, g, symmetric)
        if fast is not None:
            return fast
    form = get_format(fmt)
    if form.grouping == "row":  # zero points are what ``symmetric`` fixes: only formats storing them take it
        return form.quantize(w, g, **({"symmetric": symmetric} if "zeros" in form.buffers else {}))
    packed, absmax, sq_err = R.quantize_4bit_with_error(w, group_size, fmt)
    if double_quant:  # the stored absmax differs from the exact one: the error is measured after
        return {"qweight": packed, **R.double_quant(absmax)}
    return {"qweight": packed, "absmax": absmax, "_sq_err": sq_err}


def rtn_compiled(w: torch.Tensor, fmt: str, g: int, symmetric: bool) -> dict | None:
    """int4 / int8 round to nearest in effnb's compiled CPU routine (the reference's tensors, plus the
    squared error for the SNR), or None where it does not apply (no library, not on CPU, sizes)."""
    N, K = w.shape
    form = get_format(fmt)
    if form.layout_error(K, g) is not None:  # K not whole groups (or, int4, not whole bytes)
        return None
    lib = cpu_library(w)
    if lib is None:
        return None
    (codes_dtype, *_), codes_shape = form.expected(N, K, g)["qweight"]
    flat = w.detach().to(torch.float32).contiguous()
    q = torch.empty(*codes_shape, dtype=codes_dtype)
    scales = torch.empty(N, K // g, dtype=R.SCALE_DTYPE)
    zeros = torch.empty(N, K // g, dtype=R.SCALE_DTYPE) if "zeros" in form.buffers and not symmetric else None
    err = ctypes.c_double()
    lib.effnb_quantize_rtn(flat.data_ptr(), N, K, g, _COMPILED_MODES[fmt][symmetric], q.data_ptr(),
                           scales.data_ptr(), zeros.data_ptr() if zeros is not None else None, ctypes.byref(err),
                           cpu.num_threads())
    out = {"qweight": q, "scales": scales, "zeros": zeros}
    return {b: out[b] for b in form.buffers} | {"_sq_err": float(err.value)}
