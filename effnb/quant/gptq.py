"""GPTQ: column-by-column rounding with second-order error feedback (Frantar et al., 2022), using the
Hessian H = 2 X^T X of the layer's calibration inputs (``calibrate.py`` collects them)."""

from __future__ import annotations

import torch

from ..kernels import cpu
from ..kernels import reference as R
from .hqq import hqq
from .rounding import cpu_library, rtn


def gptq_inverse_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened H^-1, mask of dead input columns); shareable between
    layers that read the same input (q/k/v, gate/up)."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def _static_grid(W: torch.Tensor, bits: int, g: int, symmetric: bool):
    """(scales fp16, zeros fp16 or None, constant zero) of every group, fixed before the column loop."""
    if bits == 8:
        return rtn(W, "int8", g)["scales"], None, 0.0
    if symmetric:
        return R.int4_params_minmax(W, g, True)[0], None, 8.0
    grid = hqq(W, 4, g)
    return grid["scales"], grid["zeros"], 0.0


def gptq(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int, *, damp: float = 0.01,
         symmetric: bool = False, block: int = 128, factor=None) -> dict:
    """GPTQ: columns rounded one by one, each rounding error spread over the columns not yet
    rounded through the inverse Hessian of the layer's calibration inputs (H = X^T X).

    The grid (scale and zero of each group) is fixed before the loop ("static groups"): HQQ's
    optimised grid on the original weights for asymmetric int4, the range for symmetric int4 and
    int8. The column loop runs in effnb's compiled CPU routine when available (rows in parallel),
    else in the PyTorch loop of ``_block_reference`` (same arithmetic). ``factor``: a precomputed
    ``gptq_inverse_factor(hessian, damp)``.
    """
    qrange = (-127.0, 127.0) if bits == 8 else (0.0, 15.0)
    N, K = w.shape
    g = group_size or K
    Hinv, dead = factor if factor is not None else gptq_inverse_factor(hessian, damp)
    W = w.float().clone()
    W[:, dead] = 0
    scales16, zeros16, zconst = _static_grid(W, bits, g, symmetric)
    grid = (scales16.float().contiguous(), zeros16.float().contiguous() if zeros16 is not None else None, zconst, g)
    Q = torch.empty(N, K)
    lib = cpu_library(w)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        Q1, Err1 = torch.empty(N, i2 - i1), torch.empty(N, i2 - i1)
        if lib is not None:
            _block_compiled(lib, W1, Hinv1, grid, i1, qrange, Q1, Err1)
        else:
            _block_reference(W1, Hinv1, grid, i1, qrange, Q1, Err1)
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if bits == 8:
        return {"qweight": Q.to(torch.int8), "scales": scales16}
    return {"qweight": R.pack_int4(Q.to(torch.uint8)), "scales": scales16, "zeros": zeros16}


def _block_compiled(lib, W1, Hinv1, grid, i1: int, qrange, Q1, Err1) -> None:
    scales, zeros, zconst, g = grid
    N, B = W1.shape
    lib.effnb_gptq_block(W1.data_ptr(), N, B, Hinv1.data_ptr(), scales.data_ptr(),
                         zeros.data_ptr() if zeros is not None else None, zconst, scales.shape[1], g, i1, *qrange,
                         Q1.data_ptr(), Err1.data_ptr(), cpu.num_threads())


def _block_reference(W1, Hinv1, grid, i1: int, qrange, Q1, Err1) -> None:
    """One block of columns: round each, spread its error over the block's later columns (in place)."""
    scales, zeros, zconst, g = grid
    qmin, qmax = qrange
    for i in range(W1.shape[1]):
        gi = (i1 + i) // g
        s = scales[:, gi]
        z = zeros[:, gi] if zeros is not None else zconst
        wcol = W1[:, i]
        q = torch.round(wcol / s + z).clamp_(qmin, qmax)
        Q1[:, i] = q
        err = (wcol - (q - z) * s) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
