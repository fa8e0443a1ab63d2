"""Bound calls into the CPU kernels: every pointer and size fixed once, so a decode call costs a few us.

One entry per ``torch.library`` op (``ops.py``) maps the op's weight arguments to the C kernel's
pointers. ``bind_linear`` returns the closure that the op's registered CPU implementation runs;
``QuantLinear`` keeps the same closure to skip the dispatcher on decode calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import library, num_threads, raise_status, unchecked


def _ptr(t: torch.Tensor | None):
    return t.data_ptr() if t is not None else None


_TABLES: dict[str, torch.Tensor] = {}


def _table(quant_type: str) -> torch.Tensor:
    if quant_type not in _TABLES:
        from ..reference import table_4bit

        _TABLES[quant_type] = table_4bit(quant_type).contiguous()
    return _TABLES[quant_type]


# op -> (C symbol, weight arguments -> the pointers and sizes between the input's and the bias')
def _int4(qweight, scales, zeros, g):
    return qweight.data_ptr(), scales.data_ptr(), _ptr(zeros), g


def _int8(qweight, scales, g):
    return qweight.data_ptr(), scales.data_ptr(), g


def _lut4(qweight, absmax, quant_type, g, n, k):
    return qweight.data_ptr(), absmax.data_ptr(), None, None, None, 0.0, g, 256, _table(quant_type).data_ptr()


def _lut4_dq(qweight, qabsmax, absmax2, code2, offset, quant_type, g, n, k):
    return (qweight.data_ptr(), None, qabsmax.data_ptr(), code2.data_ptr(), absmax2.data_ptr(), float(offset), g,
            256, _table(quant_type).data_ptr())


_LINEAR = {"int4_linear": ("effnb_int4_linear", _int4), "int8_linear": ("effnb_int8_linear", _int8),
           "lut4_linear": ("effnb_lut4_linear", _lut4), "lut4_dq_linear": ("effnb_lut4_linear", _lut4_dq)}


def bind_linear(op: str, args: tuple, bias: torch.Tensor | None, n: int, k: int) -> Callable:
    """x [..., k] -> y [..., n] through the C kernel of ``op``, its weight arguments ``args`` bound.

    The caller has checked the buffers against (n, k) (``check_layer``): no pointer reaches C
    before that. The closure keeps every tensor it points into alive, so a buffer replaced later
    cannot leave it pointing at freed memory.
    """
    symbol, pointers = _LINEAR[op]
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    bias = bias.detach().float().contiguous() if bias is not None else None
    keep = [bias, *args]
    fn = unchecked(symbol)  # the status is tested below: no Python hook per call
    tail = (*pointers(*args), _ptr(bias))
    threads = torch.get_num_threads  # read at each call: torch.set_num_threads applies at once
    f32 = torch.float32

    def run(x: torch.Tensor, _keep=keep) -> torch.Tensor:
        if x.shape[-1] != k:  # the output is sized from x's rows: a wrong K would write past it
            raise ValueError(f"input of shape {list(x.shape)} to a QuantLinear with in_features {k}: "
                             f"the last dimension must be {k}")
        x2 = x.reshape(-1, k)
        if x2.dtype != f32 or not x2.is_contiguous():
            x2 = x2.to(f32).contiguous()
        y = torch.empty(x.shape[:-1] + (n,), dtype=f32)
        status = fn(x2.data_ptr(), x2.shape[0], k, n, *tail, y.data_ptr(), threads())
        if status:
            raise_status(status, symbol)
        return y if x.dtype == f32 else y.to(x.dtype)

    return run


# op -> (C symbol, (weight arguments, n, k) -> the arguments before the output pointer)
def _int4_dq(n, k, qweight, scales, zeros, g):
    return "effnb_int4_dequant", (qweight.data_ptr(), scales.data_ptr(), _ptr(zeros), n, k, g)


def _int8_dq(n, k, qweight, scales, g):
    return "effnb_int8_dequant", (qweight.data_ptr(), scales.data_ptr(), n, k, g)


def _lut4_dq_weights(n, k, qweight, *rest):
    from ..reference import undo_double_quant

    *stats, quant_type, g, _, _ = rest
    absmax = (stats[0] if len(stats) == 1 else undo_double_quant(*stats)).float().contiguous()
    return "effnb_lut4_dequant", (qweight.data_ptr(), absmax.data_ptr(), n * k, g, _table(quant_type).data_ptr()), absmax


_DEQUANT = {"int4_linear": _int4_dq, "int8_linear": _int8_dq, "lut4_linear": _lut4_dq_weights,
            "lut4_dq_linear": _lut4_dq_weights}


def dequantize(op: str, args: tuple, n: int, k: int) -> torch.Tensor:
    """The weight of ``op``'s arguments as fp32 [n, k], value for value the reference's (checked first)."""
    lib = library()
    symbol, pointers, *_keep = _DEQUANT[op](n, k, *args)
    # one thread writes ~7 GB/s of fp32: threads pay off only for large weights (and a thread
    # descheduled on a busy machine would stall the others at the barrier)
    nt = num_threads() if n * k >= 1 << 22 else 1
    out = torch.empty(n, k, dtype=torch.float32)
    getattr(lib, symbol)(*pointers, out.data_ptr(), nt)
    return out
