"""Backends that run a ``QuantLinear``: a typed registry, tried in order, first match wins.

    cuda-kernel   effnb.kernels.interface (x on CUDA and the kernels import)
    cpu-fast      effnb's AVX2 kernels (csrc/qlinear.cpp) for decode-sized inputs on CPU
    cpu-dequant   compiled dequantize + torch GEMM on CPU: prefill, and inputs that need gradients
    reference     dequantize to fp32 + torch.nn.functional.linear: runs anywhere, the ground truth

Each backend answers ``supports(layer, x)`` with None (yes) or the reason it cannot run; a
layer's ``backend`` setting ("auto", "reference", "cpu", "cuda") limits which are tried. Every
call is counted in ``layer.backend_calls`` so reports name the path that ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_ext

MAX_FAST_ROWS = 16  # above this many input rows (prefill), dequantize once and use a GEMM


@dataclass(frozen=True)
class Backend:
    name: str
    selector: str  # the ``--backend`` value that asks for it
    supports: Callable[[object, torch.Tensor], str | None]
    run: Callable[[object, torch.Tensor], torch.Tensor]


_REGISTRY: list[Backend] = []
BACKEND_CHOICES = ("auto", "reference", "cpu", "cuda", "bitsandbytes")


def register_backend(backend: Backend, *, before: str | None = None) -> None:
    """Add a backend (before the named one, else just ahead of the reference, which stays last)."""
    names = [b.name for b in _REGISTRY]
    if backend.name in names:
        _REGISTRY.pop(names.index(backend.name))
        names.remove(backend.name)
    if before in names:
        at = names.index(before)
    else:
        at = names.index("reference") if "reference" in names else len(names)
    _REGISTRY.insert(at, backend)


def backends() -> list[Backend]:
    return list(_REGISTRY)


def _candidates(layer) -> list[Backend]:
    if layer.backend == "auto":
        return _REGISTRY
    return [b for b in _REGISTRY if b.selector == layer.backend]


def dispatch(layer, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"input of shape {list(x.shape)} to a QuantLinear with in_features {layer.in_features}: "
                         f"the last dimension must be {layer.in_features}")
    reasons = []
    for b in _candidates(layer):
        why = b.supports(layer, x)
        if why is None:
            layer._calls[b.name] += 1
            return b.run(layer, x)
        reasons.append(f"{b.name}: {why}")
    raise RuntimeError(f"no backend can run {layer.fmt} with backend={layer.backend!r} on {x.device} "
                       f"({'; '.join(reasons)}); supported: {', '.join(b.name for b in _REGISTRY)}")


def availability(backend: str, fmt: str) -> str | None:
    """None if ``backend`` can run ``fmt`` on this machine at all, else why (checked at quantize time)."""
    if backend in ("auto", "reference"):
        return None
    if backend == "cpu":
        if fmt not in _CPU_FORMATS:
            return f"the cpu backend runs {', '.join(_CPU_FORMATS)}, not {fmt}"
        if cpu_ext.library() is None:
            return f"effnb's CPU kernels are unavailable: {cpu_ext.status()['reason']}"
        return None
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        return _cuda_kernel_fn(fmt)[1]
    return None


# ------------------------------------------------------------------------------------ reference


def _reference_run(layer, x: torch.Tensor) -> torch.Tensor:
    w = layer.dequantize().to(device=x.device, dtype=x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, w, bias)


# ------------------------------------------------------------------------------------- cpu-fast

_CPU_FORMATS = ("int4", "int8", "nf4", "fp4")


def _on_cpu(layer) -> bool:
    """Every buffer is a real CPU tensor (a meta or CUDA pointer must never reach the C code)."""
    return all(b.device.type == "cpu" for b in layer.buffers(recurse=False) if b is not None)


def _cpu_supports(layer, x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return "input not on CPU"
    if not _on_cpu(layer):
        return "weights not on CPU"
    if layer.fmt not in _CPU_FORMATS:
        return f"format {layer.fmt} has no CPU kernel"
    if x.requires_grad and torch.is_grad_enabled():
        return "input needs gradients (the kernels have no backward)"
    if x.numel() // max(layer.in_features, 1) > MAX_FAST_ROWS:
        return f"more than {MAX_FAST_ROWS} rows (prefill): dequantize + GEMM is faster"
    K, g = layer.in_features, layer.group_size
    if K % 32 or g % 32:
        return f"in_features {K} or group size {g} not a multiple of 32"
    if layer.fmt in ("nf4", "fp4") and K % g:
        return f"blocks of {g} cross rows of {K}"
    if layer.fmt in ("int4", "int8") and layer.scales.dtype != torch.float16:
        return "scales not stored in fp16"
    if cpu_ext.library() is None:
        return f"kernels unavailable ({cpu_ext.status()['reason']})"
    return None


def _ptr(t: torch.Tensor | None):
    return t.data_ptr() if t is not None else None


def _prepare_cpu(layer):
    """A closure with every pointer and size bound, so a decode call costs a few microseconds.

    The buffers are checked against the layer's sizes first (``QuantLinear.check``), and the
    closure keeps every tensor it points into alive: a buffer replaced later cannot leave it
    pointing at freed memory (``forward`` re-prepares when ``qweight`` changes).
    """
    layer.check()
    K, N, g = layer.in_features, layer.out_features, layer.group_size
    threads = torch.get_num_threads  # read at each call: torch.set_num_threads applies at once
    bias = layer.bias.detach().float().contiguous() if layer.bias is not None else None
    keep = [bias, *(b for b in layer.buffers(recurse=False) if b is not None)]
    if layer.fmt == "int4":
        name, args = "effnb_int4_linear", (layer.qweight.data_ptr(), layer.scales.data_ptr(), _ptr(layer.zeros), g)
    elif layer.fmt == "int8":
        name, args = "effnb_int8_linear", (layer.qweight.data_ptr(), layer.scales.data_ptr(), g)
    else:
        table = _table(layer.fmt)
        if layer.double_quant:
            stats = (None, layer.qabsmax.data_ptr(), layer.code2.data_ptr(), layer.absmax2.data_ptr(),
                     float(layer.offset))
        else:
            stats = (layer.absmax.data_ptr(), None, None, None, 0.0)
        name, args = "effnb_lut4_linear", (layer.qweight.data_ptr(), *stats, g, 256, table.data_ptr())
    fn = cpu_ext.unchecked(name)  # the status is tested below: no Python hook per call
    tail = (*args, _ptr(bias))
    f32 = torch.float32

    def run(x: torch.Tensor, _keep=keep) -> torch.Tensor:
        if x.shape[-1] != K:  # the output is sized from x's rows: a wrong K would write past it
            raise ValueError(f"input of shape {list(x.shape)} to a QuantLinear with in_features {K}: "
                             f"the last dimension must be {K}")
        x2 = x.reshape(-1, K)
        if x2.dtype != f32 or not x2.is_contiguous():
            x2 = x2.to(f32).contiguous()
        y = torch.empty(x.shape[:-1] + (N,), dtype=f32)
        status = fn(x2.data_ptr(), x2.shape[0], K, N, *tail, y.data_ptr(), threads())
        if status:
            cpu_ext.raise_status(status, name)
        return y if x.dtype == f32 else y.to(x.dtype)

    return run


def _cpu_run(layer, x: torch.Tensor) -> torch.Tensor:
    run = _prepare_cpu(layer)
    layer._fast = (layer.qweight.data_ptr(), MAX_FAST_ROWS * layer.in_features, run)
    return run(x)


# ----------------------------------------------------------------------------------- cpu-dequant
# Prefill (more than MAX_FAST_ROWS rows) and calls that need gradients (QLoRA training): the
# weight is dequantized by the compiled routine (values identical to ``layer.dequantize()``) and
# multiplied by torch's GEMM, which also gives autograd its backward for the input.


def _cpu_dequant_supports(layer, x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return "input not on CPU"
    if not _on_cpu(layer):
        return "weights not on CPU"
    if layer.fmt not in _CPU_FORMATS:
        return f"format {layer.fmt} has no CPU kernel"
    K, g = layer.in_features, layer.group_size
    if layer.fmt in ("int4", "int8"):
        if K % 32 or g % 32:
            return f"in_features {K} or group size {g} not a multiple of 32"
        if layer.scales.dtype != torch.float16:
            return "scales not stored in fp16"
    if cpu_ext.library() is None:
        return f"kernels unavailable ({cpu_ext.status()['reason']})"
    return None


def cpu_dequantize(layer) -> torch.Tensor:
    """``layer.dequantize()`` computed by the compiled CPU routine (same values, fp32 [N, K])."""
    layer.check()  # sizes against buffers before any pointer reaches the C code
    lib = cpu_ext.library()
    N, K, g = layer.out_features, layer.in_features, layer.group_size
    # one thread writes ~7 GB/s of fp32: threads pay off only for large weights (and a thread
    # descheduled on a busy machine would stall the others at the barrier)
    nt = cpu_ext.num_threads() if N * K >= 1 << 22 else 1
    out = torch.empty(N, K, dtype=torch.float32)
    if layer.fmt == "int4":
        lib.effnb_int4_dequant(layer.qweight.data_ptr(), layer.scales.data_ptr(), _ptr(layer.zeros), N, K, g,
                               out.data_ptr(), nt)
    elif layer.fmt == "int8":
        lib.effnb_int8_dequant(layer.qweight.data_ptr(), layer.scales.data_ptr(), N, K, g, out.data_ptr(), nt)
    else:
        absmax = layer.absmax_fp32().float().contiguous()
        lib.effnb_lut4_dequant(layer.qweight.data_ptr(), absmax.data_ptr(), N * K, g, _table(layer.fmt).data_ptr(),
                               out.data_ptr(), nt)
    return out


def dequantize_fast(layer) -> torch.Tensor:
    """``layer.dequantize()``, through the compiled routine where it applies (same values, one fp32
    allocation instead of the reference's several temporaries); QLoRA's backward uses it."""
    if _cpu_dequant_supports(layer, layer.qweight) is None:  # the weight's device stands for the input's
        return cpu_dequantize(layer)
    return layer.dequantize()


def _cpu_dequant_run(layer, x: torch.Tensor) -> torch.Tensor:
    w = cpu_dequantize(layer)
    if x.dtype != torch.float32:
        w = w.to(x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, w, bias)


_TABLES: dict[str, torch.Tensor] = {}


def _table(fmt: str) -> torch.Tensor:
    if fmt not in _TABLES:
        from .formats import table_4bit

        _TABLES[fmt] = table_4bit(fmt).contiguous()
    return _TABLES[fmt]


# ---------------------------------------------------------------------------------- cuda-kernel


def _cuda_kernel_fn(fmt: str) -> tuple[Callable | None, str | None]:
    """The one place that knows effnb.kernels' API: (function, None) or (None, reason)."""
    try:
        from effnb.kernels import interface  # type: ignore[import-not-found]
    except ImportError as exc:
        return None, f"effnb.kernels does not import ({exc})"
    name = {"int4": "int4_linear", "int8": "int8_linear", "nf4": "nf4_linear", "fp4": "fp4_linear"}.get(fmt)
    fn = getattr(interface, name, None) if name else None
    return (fn, None) if fn is not None else (None, f"effnb.kernels.interface has no {name or fmt} kernel")


def _cuda_supports(layer, x: torch.Tensor) -> str | None:
    if x.device.type != "cuda":
        return "input not on CUDA"
    if x.requires_grad and torch.is_grad_enabled():
        return "input needs gradients (the kernels have no backward)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activations in {x.dtype} (the kernels take float16, bfloat16 or float32)"
    why = _cuda_kernel_fn(layer.fmt)[1]
    if why is not None:
        return why
    from effnb.kernels import triton_available  # type: ignore[import-not-found]

    return None if triton_available() else "triton is not installed (pip install triton on Linux x86_64)"


def _cuda_run(layer, x: torch.Tensor) -> torch.Tensor:
    fn, _ = _cuda_kernel_fn(layer.fmt)
    # Keyword call: the kernels take the canonical tensors of formats.py by their buffer names.
    if layer.fmt == "int4":
        return fn(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, bias=layer.bias)
    if layer.fmt == "int8":
        return fn(x, layer.qweight, layer.scales, layer.group_size, bias=layer.bias)
    if layer.double_quant:  # the kernel reads the 8-bit absmax codes itself: no fp32 absmax per call
        from effnb.kernels.interface import DoubleQuant  # type: ignore[import-not-found]

        absmax = DoubleQuant(layer.qabsmax, layer.absmax2, layer.code2, layer.offset)
    else:
        absmax = layer.absmax
    return fn(x, layer.qweight, absmax, layer.group_size, (layer.out_features, layer.in_features),
              bias=layer.bias)


register_backend(Backend("reference", "reference", lambda layer, x: None, _reference_run))
register_backend(Backend("cpu-fast", "cpu", _cpu_supports, _cpu_run))
register_backend(Backend("cpu-dequant", "cpu", _cpu_dequant_supports, _cpu_dequant_run))
register_backend(Backend("cuda-kernel", "cuda", _cuda_supports, _cuda_run), before="cpu-fast")
