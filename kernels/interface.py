"""effnb's quantized linear ops: ``torch.library`` custom ops with a reference and a Triton kernel.

    int4_linear(x, qweight, scales, zeros, group_size, bias=None)
    int8_linear(x, qweight, scales, group_size, bias=None)
    nf4_linear(x, qweight, absmax, blocksize, shape, bias=None)      absmax: fp32 tensor or DoubleQuant
    fp4_linear(x, qweight, absmax, blocksize, shape, bias=None)

Each returns y = x @ W.T + bias for x [..., K] (fp16, bf16 or fp32) in x's dtype, with W in the
canonical layout of ``effnb.quant.formats`` (nothing is repacked, so what is saved is what runs).

Ops (declared once each): ``effnb::int4_linear``, ``effnb::int8_linear``, ``effnb::lut4_linear``
(nf4/fp4) and ``effnb::lut4_dq_linear`` (nf4/fp4 with double-quantized absmax, read as 8-bit codes
by the kernel instead of being expanded to fp32 first). The default implementation (CPU and any
device) is the PyTorch reference; CUDA runs the Triton kernels; a fake implementation gives
shapes for torch.compile / opcheck.

On CUDA, ``plan`` picks the path by the number of input rows M:
    M <= 4      "gemv"            fused dequantize + multiply-and-sum on CUDA cores, split-K
    M <= 16     "gemm-small"      fused dequantize + tl.dot, 16-row tiles, split-K
    M < 1024    "gemm"            fused dequantize + tl.dot, 64x64 tiles (128x128 from M = 128)
    M >= 1024   "dequant+cublas"  one dequantize pass into a scratch fp16/bf16 W, then cuBLAS
The thresholds are first guesses that have NOT been tuned on a GPU yet: ``benchmarks/gpu_kernels.py``
times every path so they can be set from measurements. ``EFFNB_KERNEL_PATH`` forces one path.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference

__all__ = ["int4_linear", "int8_linear", "nf4_linear", "fp4_linear", "DoubleQuant", "plan", "run_kernel",
           "kernel_support", "path_counts", "PATHS"]

PATHS = ("gemv", "gemm-small", "gemm", "dequant+cublas")
GEMV_MAX_M = 4
SMALL_MAX_M = 16
DEQUANT_MIN_M = 1024
_FMT_CODE = {"int4": 0, "int8": 1, "nf4": 2, "fp4": 2}
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

path_counts: Counter = Counter()  # how often each path ran (CUDA and run_kernel calls)


class DoubleQuant(NamedTuple):
    """bitsandbytes' compressed absmax (``compress_statistics``): absmax = code2[qabsmax] * absmax2 + offset."""

    qabsmax: torch.Tensor  # uint8 [blocks]
    absmax2: torch.Tensor  # fp32 [ceil(blocks / 256)]
    code2: torch.Tensor  # fp32 [256]
    offset: torch.Tensor  # fp32 [1]


# ------------------------------------------------------------------------------ planning


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def kernel_support(fmt: str, n: int, k: int, group: int) -> str | None:
    """None when the Triton kernels can run this weight, else the reason (then the reference runs)."""
    if group <= 0:
        return f"group/block size {group} is not positive"
    if fmt in ("int4", "nf4", "fp4") and k % 2:
        return f"in_features {k} is odd (4-bit codes are packed in pairs along a row)"
    if group == k:
        return None  # one scale per row: any K
    if k % group:
        return f"in_features {k} is not a multiple of the group/block size {group} (groups would cross rows)"
    if group < 16 or group & (group - 1):
        return f"group/block size {group} is not a power of two >= 16"
    return None


def _kernel_group(k: int, group: int) -> tuple[int, int]:
    """(GROUP constexpr, scales per row): a per-row scale becomes one power-of-two group covering K."""
    if group == k and (group & (group - 1) or group < 16):
        return max(16, _next_pow2(k)), 1
    return group, k // group


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, so CPU runs stay quick


def plan(fmt: str, m: int, n: int, k: int, group: int, device: torch.device | str = "cuda",
         path: str | None = None, sms: int | None = None) -> dict:
    """Path and launch configuration for an [m, k] x [n, k]^T product (see the module docstring).

    ``sms``: multiprocessors to fill (default: the device's; 4 for the CPU interpreter).
    """
    device = torch.device(device)
    path = path or os.environ.get("EFFNB_KERNEL_PATH") or None
    if path is None:
        path = ("gemv" if m <= GEMV_MAX_M else "gemm-small" if m <= SMALL_MAX_M
                else "gemm" if m < DEQUANT_MIN_M else "dequant+cublas")
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; expected one of {', '.join(PATHS)}")
    g, _ = _kernel_group(k, group)
    four = fmt != "int8"
    if path == "gemv":
        cfg = {"block_m": _next_pow2(max(m, 1)) if m <= GEMV_MAX_M else GEMV_MAX_M, "block_n": 16,
               "block_k": 256 if four else 128, "use_dot": False, "num_warps": 4}
    elif path == "gemm-small":
        cfg = {"block_m": 16, "block_n": 64, "block_k": 128, "use_dot": True, "num_warps": 4}
        if fmt in ("nf4", "fp4"):  # 3 stages would pipeline the table gathers as 4-byte async copies
            cfg["num_stages"] = 1     # (134 LDGSTS in the sm_90 SASS); 1 stage keeps plain 16-byte loads
    elif path == "gemm" and m < 128:
        cfg = {"block_m": 64, "block_n": 64, "block_k": 64 if four else 32, "use_dot": True, "num_warps": 4}
    elif path == "gemm":
        cfg = {"block_m": 128, "block_n": 128, "block_k": 64 if four else 32, "use_dot": True, "num_warps": 8}
    else:
        return {"path": path}
    cfg["block_k"] = max(cfg["block_k"], 32)  # 16 packed bytes at least: tl.dot needs K >= 16
    if cfg["block_k"] < g and g % cfg["block_k"]:
        cfg["block_k"] = g
    tiles = triton_cdiv(n, cfg["block_n"]) * triton_cdiv(m, cfg["block_m"])
    k_steps = triton_cdiv(k, cfg["block_k"])
    want = triton_cdiv(4 * (sms or _sm_count(device)), tiles) if path != "gemm" else 1
    cfg["split_k"] = max(1, min(want, k_steps // 2 if k_steps >= 4 else 1))
    cfg["path"] = path
    return cfg


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------ running


def run_kernel(fmt: str, x: torch.Tensor, qweight: torch.Tensor, *, n: int, k: int, group: int, scales=None,
               zeros=None, absmax=None, dq=None, bias=None, path: str | None = None, config: dict | None = None,
               return_path: bool = False):
    """The Triton implementation on any device (CPU tensors run under Triton's interpreter)."""
    from . import _triton

    why = kernel_support(fmt, n, k, group)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    qweight = qweight.contiguous()  # canonical layouts are contiguous; the kernels index rows by K
    if why is not None or m == 0:
        used = "reference"
        y = reference.reference_linear(fmt, x2, qweight, n=n, k=k, group=group, scales=scales, zeros=zeros,
                                       absmax=absmax, dq=dq, bias=bias)
    else:
        cfg = dict(config) if config is not None else plan(fmt, m, n, k, group, x.device, path)
        used = cfg.pop("path", "custom")
        g, kg = _kernel_group(k, group)
        table = _table(fmt, x.device) if fmt in ("nf4", "fp4") else None
        if dq is not None:
            dq = tuple(t.contiguous() for t in dq)
        common = dict(scales=scales if scales is not None else absmax, zeros=zeros, dq=dq, table=table)
        if used == "dequant+cublas":
            dt = x2.dtype
            w = _triton.launch_dequant(_FMT_CODE[fmt], qweight, n, k, g, kg, dt, **common)
            y = F.linear(x2, w, bias.to(dt) if bias is not None else None)
        else:
            cfg.setdefault("split_k", 1)
            y = _triton.launch_qmm(_FMT_CODE[fmt], x2, qweight, n, k, g, kg, bias=bias, **common, **cfg)
    path_counts[used] += 1
    y = y.reshape(*lead, n)
    return (y, used) if return_path else y


_TABLES: dict = {}


def _table(fmt: str, device: torch.device) -> torch.Tensor:
    key = (fmt, str(device))
    if key not in _TABLES:
        from effnb.quant.formats import table_4bit

        _TABLES[key] = table_4bit(fmt).to(device)
    return _TABLES[key]


# ------------------------------------------------------------------------------ the ops

Tensor = torch.Tensor


@torch.library.custom_op("effnb::int4_linear", mutates_args=())
def _int4_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
             bias: Tensor | None) -> Tensor:
    n, k = qweight.shape[0], qweight.shape[1] * 2
    return reference.reference_linear("int4", x, qweight, n=n, k=k, group=group_size, scales=scales, zeros=zeros,
                                      bias=bias)


@_int4_op.register_kernel("cuda")
def _int4_cuda(x, qweight, scales, zeros, group_size, bias):
    return run_kernel("int4", x, qweight, n=qweight.shape[0], k=qweight.shape[1] * 2, group=group_size,
                      scales=scales, zeros=zeros, bias=bias)


@_int4_op.register_fake
def _int4_fake(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("effnb::int8_linear", mutates_args=())
def _int8_op(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    n, k = qweight.shape
    return reference.reference_linear("int8", x, qweight, n=n, k=k, group=group_size, scales=scales, bias=bias)


@_int8_op.register_kernel("cuda")
def _int8_cuda(x, qweight, scales, group_size, bias):
    n, k = qweight.shape
    return run_kernel("int8", x, qweight, n=n, k=k, group=group_size, scales=scales, bias=bias)


@_int8_op.register_fake
def _int8_fake(x, qweight, scales, group_size, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("effnb::lut4_linear", mutates_args=())
def _lut4_op(x: Tensor, qweight: Tensor, absmax: Tensor, quant_type: str, blocksize: int, out_features: int,
             in_features: int, bias: Tensor | None) -> Tensor:
    return reference.reference_linear(quant_type, x, qweight, n=out_features, k=in_features, group=blocksize,
                                      absmax=absmax, bias=bias)


@_lut4_op.register_kernel("cuda")
def _lut4_cuda(x, qweight, absmax, quant_type, blocksize, out_features, in_features, bias):
    return run_kernel(quant_type, x, qweight, n=out_features, k=in_features, group=blocksize, absmax=absmax,
                      bias=bias)


@_lut4_op.register_fake
def _lut4_fake(x, qweight, absmax, quant_type, blocksize, out_features, in_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("effnb::lut4_dq_linear", mutates_args=())
def _lut4_dq_op(x: Tensor, qweight: Tensor, qabsmax: Tensor, absmax2: Tensor, code2: Tensor, offset: Tensor,
                quant_type: str, blocksize: int, out_features: int, in_features: int,
                bias: Tensor | None) -> Tensor:
    return reference.reference_linear(quant_type, x, qweight, n=out_features, k=in_features, group=blocksize,
                                      dq=(qabsmax, absmax2, code2, offset), bias=bias)


@_lut4_dq_op.register_kernel("cuda")
def _lut4_dq_cuda(x, qweight, qabsmax, absmax2, code2, offset, quant_type, blocksize, out_features, in_features,
                  bias):
    return run_kernel(quant_type, x, qweight, n=out_features, k=in_features, group=blocksize,
                      dq=(qabsmax, absmax2, code2, offset), bias=bias)


@_lut4_dq_op.register_fake
def _lut4_dq_fake(x, qweight, qabsmax, absmax2, code2, offset, quant_type, blocksize, out_features, in_features,
                  bias):
    return x.new_empty(*x.shape[:-1], out_features)


# ------------------------------------------------------------------------------ public functions


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
