"""The Triton kernels' host side: which path and launch configuration (``plan``), and ``run_kernel``.

On CUDA, ``plan`` picks the path by the number of input rows M:
    M <= 4      "gemv"            fused dequantize + multiply-and-sum on CUDA cores, split-K
    M <= 16     "gemm-small"      fused dequantize + tl.dot, 16-row tiles, split-K
    M < 1024    "gemm"            fused dequantize + tl.dot, 64x64 tiles (128x128 from M = 128)
    M >= 1024   "dequant+cublas"  one dequantize pass into a scratch fp16/bf16 W, then cuBLAS
The thresholds are first guesses that have NOT been tuned on a GPU yet: ``benchmarks/gpu_kernels.py``
times every path so they can be set from measurements. ``EFFNB_KERNEL_PATH`` forces one path.

The kernels themselves are in ``qmm.py`` (quantized matmul, dequantize) and ``grouped.py`` (the
MoE grouped matmul); importing this package does not import triton (they load on first launch).
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.nn.functional as F

from .. import reference
from ..formats import get_format

__all__ = ["plan", "run_kernel", "kernel_support", "path_counts", "PATHS", "FMT_CODE"]

PATHS = ("gemv", "gemm-small", "gemm", "dequant+cublas")
GEMV_MAX_M = 4
SMALL_MAX_M = 16
DEQUANT_MIN_M = 1024
FMT_CODE = {"int4": 0, "int8": 1, "nf4": 2, "fp4": 2}  # the kernels' FMT constexpr: int4, int8, 4-bit table

path_counts: Counter = Counter()  # how often each kernel path ran (CUDA and run_kernel calls)


# ------------------------------------------------------------------------------ planning


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def kernel_support(fmt: str, n: int, k: int, group: int) -> str | None:
    """None when the Triton kernels can run this weight, else the reason (then the reference runs)."""
    if group <= 0:
        return f"group/block size {group} is not positive"
    if get_format(fmt).bits == 4 and k % 2:
        return f"in_features {k} is odd (4-bit codes are packed in pairs along a row)"
    if group == k:
        return None  # one scale per row: any K
    if k % group:
        return f"in_features {k} is not a multiple of the group/block size {group} (groups would cross rows)"
    if group < 16 or group & (group - 1):
        return f"group/block size {group} is not a power of two >= 16"
    return None


def kernel_group(k: int, group: int) -> tuple[int, int]:
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
    g, _ = kernel_group(k, group)
    four = get_format(fmt).bits == 4
    if path == "gemv":
        cfg = {"block_m": _next_pow2(max(m, 1)) if m <= GEMV_MAX_M else GEMV_MAX_M, "block_n": 16,
               "block_k": 256 if four else 128, "use_dot": False, "num_warps": 4}
    elif path == "gemm-small":
        cfg = {"block_m": 16, "block_n": 64, "block_k": 128, "use_dot": True, "num_warps": 4}
        if get_format(fmt).table:  # 3 stages would pipeline the table gathers as 4-byte async copies
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
    from . import qmm

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
        g, kg = kernel_group(k, group)
        table = table_on(fmt, x.device) if get_format(fmt).table else None
        if dq is not None:
            dq = tuple(t.contiguous() for t in dq)
        common = dict(scales=scales if scales is not None else absmax, zeros=zeros, dq=dq, table=table)
        if used == "dequant+cublas":
            dt = x2.dtype
            w = qmm.launch_dequant(FMT_CODE[fmt], qweight, n, k, g, kg, dt, **common)
            y = F.linear(x2, w, bias.to(dt) if bias is not None else None)
        else:
            cfg.setdefault("split_k", 1)
            y = qmm.launch_qmm(FMT_CODE[fmt], x2, qweight, n, k, g, kg, bias=bias, **common, **cfg)
    path_counts[used] += 1
    y = y.reshape(*lead, n)
    return (y, used) if return_path else y


_TABLES: dict = {}


def table_on(fmt: str, device: torch.device) -> torch.Tensor:
    key = (fmt, str(device))
    if key not in _TABLES:
        _TABLES[key] = reference.table_4bit(fmt).to(device)
    return _TABLES[key]
