"""HQQ: calibration-free optimisation of the quantization grid (the ``hqq`` method).

Default (grid "nf4"): NF4 codes with each block's scale searched to minimise a magnitude-weighted
squared error (``hqq_nf4``). Grid "int4": half-quadratic optimisation of the int4 zero-points (Badri &
Shaji, 2023), then a least-squares refit of scale and zero on the chosen codes (``hqq``).
Each runs in effnb's compiled CPU routine when available; the ``*_reference`` functions are the
PyTorch references the compiled code is tested against.
"""

from __future__ import annotations

import ctypes

import torch

from ..kernels import cpu
from ..kernels import reference as R
from .rounding import cpu_library, rtn

HQQ_LP, HQQ_BETA, HQQ_KAPPA = 0.7, 10.0, 1.01  # the HQQ paper's defaults


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p norm (p < 1): generalised soft thresholding."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


def _lsq_refit(wg: torch.Tensor, q: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (scale, zero) for fixed codes: w ~ s * (q - z), per group (rows of wg)."""
    qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
    var = (q - qm).pow(2).mean(-1, keepdim=True)
    cov = ((q - qm) * (wg - wm)).mean(-1, keepdim=True)
    ok = var > 1e-12
    s = torch.where(ok, cov / var.clamp(min=1e-12), torch.ones_like(var))
    s = torch.where(s.abs() > 1e-12, s, torch.full_like(s, 1e-8))
    z = qm - wm / s
    return s, z


def hqq(w: torch.Tensor, bits: int, group_size: int, *, iters: int = 20, symmetric: bool = False,
        refit_rounds: int = 3) -> dict:
    """HQQ zero-point optimisation on asymmetric int4 groups, then least-squares refits of
    (scale, zero) on the chosen codes (each kept per group only where it lowers the error with
    scale and zero rounded to fp16, as stored). Each group keeps the zero of its best iteration.

    Runs in effnb's compiled CPU routine when available (8 lanes at a time; |e|^(p-1) by a
    polynomial approximation), else in ``hqq_reference``.
    """
    g = group_size or w.shape[1]
    if bits == 8 or symmetric:  # HQQ optimises zeros; with symmetric codes there is nothing to fit
        return rtn(w, "int8" if bits == 8 else "int4", g, symmetric=symmetric)
    lib = cpu_library(w) if g % 8 == 0 and g <= 256 else None  # the routine's lanes and stack buffers
    if lib is not None:
        return _hqq_compiled(lib, w, bits, g, iters, refit_rounds)
    return hqq_reference(w, bits, g, iters=iters, refit_rounds=refit_rounds)


def _hqq_compiled(lib, w: torch.Tensor, bits: int, g: int, iters: int, refit_rounds: int) -> dict:
    N, K = w.shape
    flat = w.detach().to(torch.float32).contiguous()
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(N, K // g, dtype=R.SCALE_DTYPE)
    zeros = torch.empty(N, K // g, dtype=R.SCALE_DTYPE)
    err = ctypes.c_double()
    lib.effnb_hqq(flat.data_ptr(), N * (K // g), g, 2 ** bits - 1, iters, HQQ_LP, HQQ_BETA, HQQ_KAPPA, refit_rounds,
                  codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), ctypes.byref(err), cpu.num_threads())
    return {"qweight": R.pack_int4(codes), "scales": scales, "zeros": zeros, "_sq_err": float(err.value)}


def _best_zeros(wg: torch.Tensor, s: torch.Tensor, levels: int, iters: int) -> torch.Tensor:
    """Half-quadratic iterations on the zero-points; each group keeps the zero of its best iteration."""
    inv = 1.0 / s
    zero = -wg.amin(-1, keepdim=True) / s
    beta = HQQ_BETA
    best_err = torch.full_like(zero, float("inf"))
    best_zero = zero.clone()
    for _ in range(iters):
        wq = torch.round(wg * inv + zero).clamp_(0, levels)
        e = wg - (wq - zero) / inv
        err = e.abs().mean(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
        we = _shrink_lp(e, beta, HQQ_LP)
        zero = torch.mean(wq - (wg - we) * inv, dim=-1, keepdim=True)
        beta *= HQQ_KAPPA
    return best_zero


def hqq_reference(w: torch.Tensor, bits: int, g: int, *, iters: int = 20, refit_rounds: int = 3) -> dict:
    """The PyTorch reference of ``hqq`` (asymmetric groups)."""
    levels = 2 ** bits - 1
    N, K = w.shape
    wg = w.float().reshape(-1, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).clamp(min=1e-8)

    def stored(s, z):  # round to the storage dtype, choose codes, measure the error per group
        s16, z16 = s.to(R.SCALE_DTYPE), z.to(R.SCALE_DTYPE)
        q = torch.round(wg / s16.float() + z16.float()).clamp(0, levels)
        err = (wg - (q - z16.float()) * s16.float()).pow(2).sum(-1, keepdim=True)
        return s16, z16, q, err

    s16, z16, q, err = stored(s, _best_zeros(wg, s, levels, iters))
    for _ in range(refit_rounds):
        s_new, z_new = _lsq_refit(wg, q, levels)
        s2, z2, q2, err2 = stored(s_new, z_new)
        better = err2 < err
        s16, z16 = torch.where(better, s2, s16), torch.where(better, z2, z16)
        q, err = torch.where(better, q2, q), torch.minimum(err, err2)
    return {"qweight": R.pack_int4(q.reshape(N, K).to(torch.uint8)), "scales": s16.reshape(N, K // g),
            "zeros": z16.reshape(N, K // g)}


# ----------------------------------------------------------------------------- hqq, NF4 grid

NF4_SEARCH_ALPHA, NF4_SEARCH_LOW, NF4_SEARCH_STEPS = 64.0, 0.85, 11  # chosen on the calibration text: docs/quantization.md


def _search_factors(low: float, steps: int) -> list[torch.Tensor]:
    """The scale factors tried, in float32 exactly as the compiled routine computes them."""
    f = torch.float32
    lo, one = torch.tensor(low, dtype=f), torch.tensor(1.0, dtype=f)
    if steps == 1:
        return [one]
    return [lo + (one - lo) * torch.tensor(float(i), dtype=f) / torch.tensor(float(steps - 1), dtype=f)
            for i in range(steps)]


def hqq_nf4(w: torch.Tensor, group_size: int, *, alpha: float | None = None, low: float | None = None,
            steps: int | None = None) -> dict:
    """Calibration-free NF4 with an optimised scale per block (effnb's default ``hqq``).

    NF4's levels suit normally distributed weights, but its scale, the block's absmax, is set by one
    weight. Here each block's scale is chosen among absmax * a (a from ``low`` to 1, ``steps``
    values) to minimise the weighted squared error sum (1 + alpha (w / absmax)^2) (w - w_q)^2:
    large weights, whose errors the activations amplify most, count up to 1 + alpha times more.
    Stored exactly as bitsandbytes' NF4 (the scale in the absmax slot): same bytes per weight,
    same kernels, readable by bitsandbytes. Compiled on CPU when available, else
    ``hqq_nf4_reference`` (same arithmetic up to the order of the error sums).
    """
    alpha = NF4_SEARCH_ALPHA if alpha is None else alpha
    low = NF4_SEARCH_LOW if low is None else low
    steps = NF4_SEARCH_STEPS if steps is None else steps
    lib = cpu_library(w) if w.numel() % 2 == 0 else None  # two codes a byte
    if lib is None:
        return hqq_nf4_reference(w, group_size, alpha=alpha, low=low, steps=steps)
    flat = w.detach().reshape(-1).to(torch.float32).contiguous()
    code, bounds, order = R.bucket_search("nf4")
    order8 = order.to(torch.uint8)  # kept in a name: a temporary would be freed before the call reads it
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
    scales = torch.empty(-(-flat.numel() // group_size), dtype=torch.float32)
    err = ctypes.c_double()
    lib.effnb_nf4_search(flat.data_ptr(), flat.numel(), group_size, bounds.data_ptr(), order8.data_ptr(),
                         code.data_ptr(), alpha, low, steps, packed.data_ptr(), scales.data_ptr(), ctypes.byref(err),
                         cpu.num_threads())
    return {"qweight": packed, "absmax": scales, "_sq_err": float(err.value)}


def hqq_nf4_reference(w: torch.Tensor, group_size: int, *, alpha: float = NF4_SEARCH_ALPHA,
                      low: float = NF4_SEARCH_LOW, steps: int = NF4_SEARCH_STEPS) -> dict:
    """PyTorch reference of ``hqq_nf4`` (whole blocks only: numel a multiple of group_size)."""
    code, bounds, order = R.bucket_search("nf4")
    wg = w.detach().reshape(-1, group_size).float()
    am = wg.abs().amax(-1, keepdim=True)
    wt = 1.0 + alpha * (wg * (1.0 / am.clamp(min=1e-38))).pow(2)

    def codes(s):
        sc = torch.clamp(wg * (1.0 / s.clamp(min=1e-38)), -1, 1)
        return order[torch.bucketize(sc, bounds)]

    best_e = best_s = None
    for a in _search_factors(low, steps):
        s = am * a
        e = (wt * (wg - code[codes(s)] * s).pow(2)).sum(-1, keepdim=True)
        if best_e is None:
            best_e, best_s = e, s
        else:
            better = e < best_e
            best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    q = codes(best_s).to(torch.uint8).reshape(-1)
    return {"qweight": (q[::2] << 4) | q[1::2], "absmax": best_s.reshape(-1)}
