"""Triton grouped GEMM for the MoE block: rows sorted by expert times each expert's weight.

    y[rows of expert e] = xs[rows of expert e] @ w[e]        xs [N, K], w [E, K, M], y [N, M]

``offs`` [E] (int32) holds the end row of each expert's rows (the cumulative token counts), the
layout ``torch._grouped_mm`` takes and ``effnb.moe``'s block produces after sorting.

Schedule: one program per (row tile of one expert, column tile). Expert e owns
``ceil(count_e / BLOCK_M)`` row tiles; their cumulative sum (``tile_end`` [E], computed on the
device, so no host sync) maps a program's row-tile index to its expert with one vectorised
compare over the E entries. The grid is launched for the worst case, ``ceil(N / BLOCK_M) + E``
row tiles; programs past the last tile do nothing (all their loads and stores are masked).
Each program walks K in steps of BLOCK_K, ``tl.dot`` of an [BLOCK_M, BLOCK_K] activation tile
and an [BLOCK_K, BLOCK_N] weight tile (bf16/fp16 in, fp32 accumulation), and stores its tile
in the output dtype. Empty experts get no tiles, so their weights are never read.

The block sizes come from a small heuristic (``plan``), not from tuning: few rows per expert
(decode, bound by reading the weights) use 16-row tiles, many rows 64-row tiles. Whether this
kernel or ``torch._grouped_mm`` is faster has to be measured on the GPU at hand
(``python benchmarks/moe.py --device cuda --dtype bfloat16``); it has not been measured yet.

With ``TRITON_INTERPRET=1`` set before triton is imported the kernel runs on CPU tensors under
Triton's interpreter, which is how ``tests/kernels/test_moe_grouped.py`` checks it without a GPU.
Forward only: ``effnb.moe`` uses it for inference and keeps the autograd-capable paths for training.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effnb.torch_utils import triton_interpreting


@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offs_ptr, tile_end_ptr, M, K, stride_xn, stride_we, stride_wk,
                       stride_yn, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EMU: tl.constexpr):
    pid_t = tl.program_id(0)  # row tile, counted over all experts
    pid_n = tl.program_id(1)
    # ---- which expert owns row tile pid_t: the number of experts whose tiles end at or before it
    ei = tl.arange(0, E_POW2)
    tile_end = tl.load(tile_end_ptr + ei, mask=ei < E, other=2147483647)
    e = tl.sum((tile_end <= pid_t).to(tl.int32), axis=0)
    valid = e < E
    e = tl.minimum(e, E - 1)
    tiles_before = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    row_begin = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(offs_ptr + e)
    row_end = tl.where(valid, row_end, 0)  # past the last tile: nothing to load or store
    rm = row_begin + (pid_t - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < row_end
    n_ok = rn < M
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xn
    w_tile = w_ptr + e.to(tl.int64) * stride_we + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
            b = tl.load(w_tile + kk.to(tl.int64)[:, None] * stride_wk, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = kk < K
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_tile + kk.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if EMU:  # the interpreter's bf16 dot multiplies raw bits: convert, same values, fp32 math
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_yn + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def plan(rows: int, experts: int, k: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for ``rows`` sorted rows over ``experts`` experts (heuristic, untuned)."""
    per_expert = rows / max(experts, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    block_n = 64 if m <= 64 else 128
    block_k = 32 if k <= 32 else 64
    return block_m, block_n, block_k


def grouped_mm(xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, blocks: tuple[int, int, int] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[offs[e-1]:offs[e]] = xs[offs[e-1]:offs[e]] @ w[e]``; xs [N, K], w [E, K, M], offs [E] int32 -> [N, M].

    xs and w share a dtype (bf16, fp16 or fp32); accumulation is fp32. Rows past ``offs[-1]``
    are not written (left as they are in ``out``, uninitialised in a new output).
    """
    if xs.dim() != 2 or w.dim() != 3 or xs.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm needs xs [N, K] and w [E, K, M]; got {tuple(xs.shape)} and {tuple(w.shape)}")
    if xs.dtype != w.dtype:
        raise ValueError(f"grouped_mm needs xs and w of one dtype; got {xs.dtype} and {w.dtype}")
    if offs.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm needs offs of shape [E] = [{w.shape[0]}]; got {tuple(offs.shape)}")
    if xs.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("the Triton grouped GEMM on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported (effnb.kernels.use_interpreter() does it)")
    n, k = xs.shape
    e, _, m = w.shape
    xs = xs if xs.stride(1) == 1 else xs.contiguous()
    w = w if w.stride(2) == 1 else w.contiguous()
    y = out if out is not None else torch.empty(n, m, dtype=xs.dtype, device=xs.device)
    if n == 0 or m == 0:
        return y
    bm, bn, bk = blocks or plan(n, e, k, m)
    offs = offs.to(torch.int32)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    tile_end = torch.cumsum((counts + bm - 1) // bm, 0).to(torch.int32)
    grid = (triton.cdiv(n, bm) + e, triton.cdiv(m, bn))
    _grouped_mm_kernel[grid](xs, w, y, offs, tile_end, m, k, xs.stride(0), w.stride(0), w.stride(1), y.stride(0),
                             E=e, E_POW2=triton.next_power_of_2(e), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             EVEN_K=k % bk == 0, EMU=triton_interpreting() and xs.dtype == torch.bfloat16)
    return y


def grouped_mm_reference(xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The same product with one fp32 matmul per expert (the ground truth of the tests), fp32 [N, M]."""
    y = torch.zeros(xs.shape[0], w.shape[2], dtype=torch.float32, device=xs.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            y[start:end] = xs[start:end].float() @ w[e].float()
        start = end
    return y
