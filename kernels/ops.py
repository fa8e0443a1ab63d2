"""effnb's quantized linear ops, declared once each with ``torch.library``, and the one place that
decides which implementation runs.

    effnb::int4_linear(x, qweight, scales, zeros, group_size, bias)
    effnb::int8_linear(x, qweight, scales, group_size, bias)
    effnb::lut4_linear(x, qweight, absmax, quant_type, blocksize, out_features, in_features, bias)
    effnb::lut4_dq_linear(x, qweight, qabsmax, absmax2, code2, offset, quant_type, blocksize,
                          out_features, in_features, bias)       nf4/fp4 with double-quantized absmax

Each returns y = x @ W.T + bias in x's dtype, W in the canonical layout (``reference.py``). The
default implementation is the PyTorch reference; the CPU one runs effnb's C++ kernels
(``kernels/cpu``) where ``supports`` allows, the CUDA one the Triton kernels (``kernels/triton``);
a fake implementation gives shapes for torch.compile and opcheck.

``supports(path, ...)`` is the only place that answers "can this run here, and if not why" for
the paths a report names:

    cuda-kernel   the Triton kernels (input on CUDA)
    cpu-fast      the C++ kernels, for decode-sized inputs (at most MAX_FAST_ROWS rows)
    cpu-dequant   the compiled dequantize + torch's GEMM: prefill, and inputs that need gradients
                  (the GEMM gives autograd its backward, which QLoRA needs)
    reference     dequantize to fp32 + torch.nn.functional.linear: runs anywhere, the ground truth
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from effnb.torch_utils import triton_interpreting

from . import cpu, reference, triton_available
from .cpu import bind
from .formats import DQ_STATS, get_format
from .linear import check_layer

MAX_FAST_ROWS = 16  # above this many input rows (prefill), dequantize once and use a GEMM
PATHS = ("cuda-kernel", "cpu-fast", "cpu-dequant", "reference")  # tried in this order under "auto"
GROUPED_PATHS = ("torch._grouped_mm", "triton", "per-expert loop")  # the MoE block's, in order of preference
SELECTORS = {"cuda-kernel": "cuda", "cpu-fast": "cpu", "cpu-dequant": "cpu", "reference": "reference"}
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

path_counts: Counter = Counter()  # which path served each call of an op (the layer counts its own)


# ------------------------------------------------------------------------------ supports


def _cpu_reason(form, x, tensors, group_size, shape, fast: bool) -> str | None:
    if x is not None and x.device.type != "cpu":
        return "input not on CPU"
    if tensors is not None and any(t.device.type != "cpu" for t in tensors.values() if t is not None):
        return "weights not on CPU"  # a meta or CUDA pointer must never reach the C code
    if not form.cpu_kernel:
        return f"format {form.name} has no CPU kernel"
    if fast and x is not None:
        if x.requires_grad and torch.is_grad_enabled():
            return "input needs gradients (the kernels have no backward)"
        if x.numel() // max(shape[1], 1) > MAX_FAST_ROWS:
            return f"more than {MAX_FAST_ROWS} rows (prefill): dequantize + GEMM is faster"
    why = form.cpu_error(shape[1], group_size, fast) if shape is not None else None
    if why is not None:
        return why
    if form.cpu_fp16_scales and tensors is not None and tensors["scales"].dtype != torch.float16:
        return "scales not stored in fp16"
    if cpu.library() is None:
        return f"kernels unavailable ({cpu.status()['reason']})"
    return None


def _cuda_reason(form, x) -> str | None:
    if x is None and not torch.cuda.is_available():
        return "no CUDA device"
    if x is not None:
        if x.device.type != "cuda":
            return "input not on CUDA"
        if x.requires_grad and torch.is_grad_enabled():
            return "input needs gradients (the kernels have no backward)"
        if x.dtype not in _ACT_DTYPES:
            return f"activations in {x.dtype} (the kernels take float16, bfloat16 or float32)"
    if not form.ops:
        return f"format {form.name} has no CUDA kernel"
    return None if triton_available() else "triton is not installed (pip install triton on Linux x86_64)"


def _grouped_reason(path: str, x, w, needs_grad: bool) -> str | None:
    if x.dtype != w.dtype:
        return f"activations in {x.dtype}, weights in {w.dtype}"
    if path == "torch._grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            return "this torch has no _grouped_mm"
        if x.device.type == "cuda":  # the CUDA kernel: bf16 on sm90+, 16-byte aligned rows
            ok = (x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
                  and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0)
            return None if ok else "the CUDA kernel takes bfloat16 on sm90+ with rows a multiple of 8"
        return None
    if needs_grad:
        return "needs gradients (the Triton kernel is forward only)"
    if x.dtype not in _ACT_DTYPES:
        return f"activations in {x.dtype} (the kernel takes float16, bfloat16 or float32)"
    if x.device.type == "cuda":
        return None if triton_available() else "triton is not installed (pip install triton on Linux x86_64)"
    if x.device.type == "cpu":
        return None if triton_interpreting() else "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    return f"no Triton kernel for {x.device.type} tensors"


def supports(path: str, fmt: str | None = None, x: torch.Tensor | None = None, *, tensors: dict | None = None,
             group_size: int | None = None, shape: tuple[int, int] | None = None, w: torch.Tensor | None = None,
             needs_grad: bool = False) -> str | None:
    """None if ``path`` can run here, else why not.

    Quantized linear paths (PATHS) take the format ``fmt``; ``x`` (the input), ``tensors`` (the
    weight's buffers), ``group_size`` and ``shape`` (n, k) narrow the question; left out, it is
    asked of this machine at all (at quantize time). The MoE grouped matmul paths (GROUPED_PATHS)
    take the sorted rows ``x``, the stacked expert weights ``w`` and whether gradients are needed.
    """
    if path in GROUPED_PATHS:
        return None if path == "per-expert loop" else _grouped_reason(path, x, w, needs_grad)
    form = get_format(fmt)
    if path in ("cpu-fast", "cpu-dequant"):
        return _cpu_reason(form, x, tensors, group_size, shape, fast=path == "cpu-fast")
    if path == "cuda-kernel":
        return _cuda_reason(form, x)
    if path == "reference":
        return None
    raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")


def availability(backend: str, fmt: str) -> str | None:
    """None if a layer's ``backend`` setting can run ``fmt`` on this machine at all, else why."""
    reasons = [supports(p, fmt) for p in PATHS if SELECTORS[p] == backend]
    return None if not reasons or None in reasons else reasons[0]


def grouped_path(x: torch.Tensor, w: torch.Tensor, needs_grad: bool = False) -> str:
    """The MoE grouped matmul to use for sorted rows ``x`` and expert weights ``w`` (one of GROUPED_PATHS).

    The GPU kernels are chosen on CUDA only: on CPU, torch 2.13's ``_grouped_mm`` runs but is slower
    than one matmul per expert (benchmarks/moe.py, 2 threads: 145 vs 48 ms at 2048 tokens, 6.3 vs
    2.0 ms at 16), and the Triton kernel there is its interpreter (for tests).
    """
    for path in GROUPED_PATHS:
        if (x.device.type == "cuda" or path == "per-expert loop") and supports(path, x=x, w=w,
                                                                                 needs_grad=needs_grad) is None:
            return path
    raise AssertionError("unreachable: the per-expert loop always runs")


def grouped_mm(xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """effnb's Triton grouped GEMM: ``y[offs[e-1]:offs[e]] = xs[offs[e-1]:offs[e]] @ w[e]``.

    xs [N, K] (rows sorted by expert), w [E, K, M], offs [E] int32 cumulative row counts -> [N, M];
    forward only. Check ``supports("triton", x=xs, w=w)`` first.
    """
    from .triton.grouped import grouped_mm as launch

    return launch(xs, w, offs)


# ------------------------------------------------------------------------------ the ops
# Each op's weight arguments (between x and bias): the tensors' buffer names, and where the
# format, group and sizes come from.


def _int4_sizes(qweight, scales, zeros, g):
    return "int4", g, qweight.shape[0], qweight.shape[1] * 2


def _int8_sizes(qweight, scales, g):
    return "int8", g, qweight.shape[0], qweight.shape[1]


def _lut4_sizes(qweight, *rest):
    quant_type, g, n, k = rest[-4:]
    return quant_type, g, n, k


_SPECS = {"int4_linear": (("qweight", "scales", "zeros"), _int4_sizes),
          "int8_linear": (("qweight", "scales"), _int8_sizes),
          "lut4_linear": (("qweight", "absmax"), _lut4_sizes),
          "lut4_dq_linear": (("qweight", *DQ_STATS), _lut4_sizes)}


def _unpack(op: str, wargs: tuple) -> tuple[str, dict, int, int, int]:
    names, sizes = _SPECS[op]
    fmt, g, n, k = sizes(*wargs)
    return fmt, dict(zip(names, wargs)), g, n, k


def _reference(op: str, x, wargs: tuple, bias):
    """y = x @ W.T + bias in fp32 (float64 for float64 x), returned in x's dtype."""
    fmt, tensors, g, n, k = _unpack(op, wargs)
    return reference.linear(x, get_format(fmt).dequantize(tensors, g, (n, k)), bias)


def _on_cpu(op: str, x, wargs: tuple, bias):
    """The registered CPU implementation: the C++ kernel where ``supports`` allows, else the reference."""
    fmt, tensors, g, n, k = _unpack(op, wargs)
    check_layer(k, n, fmt, g, tensors, bias)  # sizes against buffers before any pointer reaches C
    for path in ("cpu-fast", "cpu-dequant"):
        if supports(path, fmt, x, tensors=tensors, group_size=g, shape=(n, k)) is None:
            path_counts[path] += 1
            if path == "cpu-fast":
                return bind.bind_linear(op, wargs, bias, n, k)(x)
            return _gemm(x, bind.dequantize(op, wargs, n, k), bias)
    path_counts["reference"] += 1
    return _reference(op, x, wargs, bias)


def _on_cuda(op: str, x, wargs: tuple, bias):
    from .triton import run_kernel

    fmt, tensors, g, n, k = _unpack(op, wargs)
    dq = tuple(tensors[s] for s in DQ_STATS) if "qabsmax" in tensors else None
    path_counts["cuda-kernel"] += 1
    return run_kernel(fmt, x, tensors["qweight"], n=n, k=k, group=g, scales=tensors.get("scales"),
                      zeros=tensors.get("zeros"), absmax=tensors.get("absmax"), dq=dq, bias=bias)


def _fake(op: str, x, wargs: tuple, bias):
    return x.new_empty(*x.shape[:-1], _unpack(op, wargs)[3])


Tensor = torch.Tensor


@torch.library.custom_op("effnb::int4_linear", mutates_args=())
def _int4_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
             bias: Tensor | None) -> Tensor:
    return _reference("int4_linear", x, (qweight, scales, zeros, group_size), bias)


@torch.library.custom_op("effnb::int8_linear", mutates_args=())
def _int8_op(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    return _reference("int8_linear", x, (qweight, scales, group_size), bias)


@torch.library.custom_op("effnb::lut4_linear", mutates_args=())
def _lut4_op(x: Tensor, qweight: Tensor, absmax: Tensor, quant_type: str, blocksize: int, out_features: int,
             in_features: int, bias: Tensor | None) -> Tensor:
    return _reference("lut4_linear", x, (qweight, absmax, quant_type, blocksize, out_features, in_features), bias)


@torch.library.custom_op("effnb::lut4_dq_linear", mutates_args=())
def _lut4_dq_op(x: Tensor, qweight: Tensor, qabsmax: Tensor, absmax2: Tensor, code2: Tensor, offset: Tensor,
                quant_type: str, blocksize: int, out_features: int, in_features: int,
                bias: Tensor | None) -> Tensor:
    wargs = (qweight, qabsmax, absmax2, code2, offset, quant_type, blocksize, out_features, in_features)
    return _reference("lut4_dq_linear", x, wargs, bias)


def _register(op_def, op: str) -> None:
    """CPU, CUDA and fake implementations of ``op``: all take (x, *weight arguments, bias)."""
    op_def.register_kernel("cpu")(lambda x, *rest: _on_cpu(op, x, rest[:-1], rest[-1]))
    op_def.register_kernel("cuda")(lambda x, *rest: _on_cuda(op, x, rest[:-1], rest[-1]))
    op_def.register_fake(lambda x, *rest: _fake(op, x, rest[:-1], rest[-1]))


for _def, _name in ((_int4_op, "int4_linear"), (_int8_op, "int8_linear"), (_lut4_op, "lut4_linear"),
                    (_lut4_dq_op, "lut4_dq_linear")):
    _register(_def, _name)


# ------------------------------------------------------------------------------ QuantLinear


def _gemm(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """x @ w.T + bias in x's dtype (autograd flows through to x)."""
    if x.dtype != w.dtype:
        w = w.to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def _layer_call(layer) -> tuple[str, tuple]:
    return layer.format.op_args(layer.tensors(), layer.group_size, (layer.out_features, layer.in_features))


def cpu_dequantize(layer) -> torch.Tensor:
    """``layer.dequantize()`` computed by the compiled CPU routine (same values, fp32 [N, K])."""
    layer.check()  # sizes against buffers before any pointer reaches the C code
    return bind.dequantize(*_layer_call(layer), layer.out_features, layer.in_features)


def dequantize_fast(layer) -> torch.Tensor:
    """``layer.dequantize()``, through the compiled routine where it applies (same values, one fp32
    allocation instead of the reference's several temporaries); QLoRA's backward uses it."""
    if _layer_supports(layer, "cpu-dequant", layer.qweight) is None:  # the weight's device stands for the input's
        return cpu_dequantize(layer)
    return layer.dequantize()


def _layer_supports(layer, path: str, x: torch.Tensor) -> str | None:
    return supports(path, layer.fmt, x, tensors=layer.tensors(), group_size=layer.group_size,
                    shape=(layer.out_features, layer.in_features))


def _run_cpu_fast(layer, x):
    layer.check()
    run = bind.bind_linear(*_layer_call(layer), layer.bias, layer.out_features, layer.in_features)
    layer.keep_fast_call(run, MAX_FAST_ROWS * layer.in_features)
    return run(x)


def _run_cuda(layer, x):
    op, args = _layer_call(layer)
    return getattr(torch.ops.effnb, op)(x, *args, layer.bias)


_RUN = {"cuda-kernel": _run_cuda, "cpu-fast": _run_cpu_fast,
        "cpu-dequant": lambda layer, x: _gemm(x, cpu_dequantize(layer), layer.bias),
        "reference": lambda layer, x: _gemm(x, layer.dequantize().to(x.device), layer.bias)}


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.forward``: the first path (in PATHS order) that the layer's ``backend`` setting
    allows and ``supports`` accepts; counted in ``layer.backend_calls``."""
    if x.ndim == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"input of shape {list(x.shape)} to a QuantLinear with in_features {layer.in_features}: "
                         f"the last dimension must be {layer.in_features}")
    reasons = []
    for path in PATHS:
        if layer.backend != "auto" and SELECTORS[path] != layer.backend:
            continue
        why = _layer_supports(layer, path, x)
        if why is None:
            layer.count_call(path)
            return _RUN[path](layer, x)
        reasons.append(f"{path}: {why}")
    raise RuntimeError(f"no backend can run {layer.fmt} with backend={layer.backend!r} on {x.device} "
                       f"({'; '.join(reasons)}); supported: {', '.join(PATHS)}")
