"""Quantization methods: weight [N, K] (fp32) -> the tensors of a storage format (formats.py).

rtn    round to nearest with each group's range (int4, int8, fp8, nf4, fp4)
hqq    calibration-free optimisation of the quantization grid. Default (grid "nf4"): NF4 codes
       with each block's scale searched to minimise a magnitude-weighted squared error
       (``hqq_nf4``). Grid "int4": half-quadratic optimisation of the int4 zero-points (Badri &
       Shaji, 2023), then a least-squares refit of scale and zero on the chosen codes (``hqq``)
gptq   column-by-column rounding with second-order error feedback (Frantar et al., 2022), using
       the Hessian H = 2 X^T X of the layer's calibration inputs
"""

from __future__ import annotations

import torch

from . import formats as F


def rtn(w: torch.Tensor, fmt: str, group_size: int, *, symmetric: bool = False, double_quant: bool = False) -> dict:
    """Round-to-nearest tensors for ``fmt`` (group_size 0 = per output channel)."""
    g = group_size or w.shape[1]
    if fmt in ("int4", "int8"):
        fast = _rtn_compiled(w, fmt, g, symmetric)
        if fast is not None:
            return fast
    if fmt == "int4":
        return F.quantize_int4(w, g, symmetric)
    if fmt == "int8":
        return F.quantize_int8(w, g)
    if fmt == "fp8":
        return F.quantize_fp8(w, g)
    packed, absmax, sq_err = F.quantize_4bit_with_error(w, group_size, fmt)
    if double_quant:  # the stored absmax differs from the exact one: the error is measured after
        return {"qweight": packed, **F.double_quant(absmax)}
    return {"qweight": packed, "absmax": absmax, "_sq_err": sq_err}


def _rtn_compiled(w: torch.Tensor, fmt: str, g: int, symmetric: bool) -> dict | None:
    """``F.quantize_int4`` / ``F.quantize_int8`` in effnb's compiled CPU routine (same tensors, plus
    the squared error for the SNR), or None where it does not apply (no library, not on CPU)."""
    N, K = w.shape
    if w.device.type != "cpu" or K % g or (fmt == "int4" and K % 2):
        return None
    from . import cpu_ext

    lib = cpu_ext.library(quiet=True)
    if lib is None:
        return None
    flat = w.detach().to(torch.float32).contiguous()
    G = K // g
    q = torch.empty(N, K // 2 if fmt == "int4" else K, dtype=torch.uint8 if fmt == "int4" else torch.int8)
    scales = torch.empty(N, G, dtype=F.SCALE_DTYPE)
    zeros = torch.empty(N, G, dtype=F.SCALE_DTYPE) if fmt == "int4" and not symmetric else None
    err = F.ctypes_double()
    mode = 2 if fmt == "int8" else (1 if symmetric else 0)
    lib.effnb_quantize_rtn(flat.data_ptr(), N, K, g, mode, q.data_ptr(), scales.data_ptr(),
                           zeros.data_ptr() if zeros is not None else None, F.ctypes_ref(err), cpu_ext.num_threads())
    if fmt == "int8":
        return {"qweight": q, "scales": scales, "_sq_err": float(err.value)}
    return {"qweight": q, "scales": scales, "zeros": zeros, "_sq_err": float(err.value)}


# ------------------------------------------------------------------------------------------- hqq


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


HQQ_LP, HQQ_BETA, HQQ_KAPPA = 0.7, 10.0, 1.01  # the HQQ paper's defaults


def hqq(w: torch.Tensor, bits: int, group_size: int, *, iters: int = 20, symmetric: bool = False,
        refit_rounds: int = 3) -> dict:
    """HQQ zero-point optimisation on asymmetric int4 groups, then least-squares refits of
    (scale, zero) on the chosen codes (each kept per group only where it lowers the error with
    scale and zero rounded to fp16, as stored). Each group keeps the zero of its best iteration.

    Runs in effnb's compiled CPU routine when available (8 lanes at a time; |e|^(p-1) by a
    polynomial approximation), else in the PyTorch code below, the reference.
    """
    levels = 2 ** bits - 1
    g = group_size or w.shape[1]
    N, K = w.shape
    if bits == 8 or symmetric:  # HQQ optimises zeros; with symmetric codes there is nothing to fit
        return rtn(w, "int8" if bits == 8 else "int4", g, symmetric=symmetric)
    if w.device.type == "cpu" and g % 8 == 0 and g <= 256:
        from . import cpu_ext

        lib = cpu_ext.library(quiet=True)
        if lib is not None:
            flat = w.detach().to(torch.float32).contiguous()
            codes = torch.empty(N, K, dtype=torch.uint8)
            scales = torch.empty(N, K // g, dtype=F.SCALE_DTYPE)
            zeros = torch.empty(N, K // g, dtype=F.SCALE_DTYPE)
            err = F.ctypes_double()
            lib.effnb_hqq(flat.data_ptr(), N * (K // g), g, levels, iters, HQQ_LP, HQQ_BETA, HQQ_KAPPA, refit_rounds,
                          codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), F.ctypes_ref(err),
                          cpu_ext.num_threads())
            return {"qweight": F.pack_int4(codes), "scales": scales, "zeros": zeros, "_sq_err": float(err.value)}
    return hqq_reference(w, bits, g, iters=iters, refit_rounds=refit_rounds)


def hqq_reference(w: torch.Tensor, bits: int, g: int, *, iters: int = 20, refit_rounds: int = 3) -> dict:
    """The PyTorch reference of ``hqq`` (asymmetric groups)."""
    levels = 2 ** bits - 1
    N, K = w.shape
    wg = w.float().reshape(-1, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).clamp(min=1e-8)
    inv = 1.0 / s
    zero = -lo / s
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

    def stored(s, z):  # round to the storage dtype, choose codes, measure the error per group
        s16, z16 = s.to(F.SCALE_DTYPE), z.to(F.SCALE_DTYPE)
        q = torch.round(wg / s16.float() + z16.float()).clamp(0, levels)
        err = (wg - (q - z16.float()) * s16.float()).pow(2).sum(-1, keepdim=True)
        return s16, z16, q, err

    s16, z16, q, err = stored(s, best_zero)
    for _ in range(refit_rounds):
        s_new, z_new = _lsq_refit(wg, q, levels)
        s2, z2, q2, err2 = stored(s_new, z_new)
        better = err2 < err
        s16, z16 = torch.where(better, s2, s16), torch.where(better, z2, z16)
        q, err = torch.where(better, q2, q), torch.minimum(err, err2)
    return {"qweight": F.pack_int4(q.reshape(N, K).to(torch.uint8)), "scales": s16.reshape(N, K // g),
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
    g = group_size
    alpha = NF4_SEARCH_ALPHA if alpha is None else alpha
    low = NF4_SEARCH_LOW if low is None else low
    steps = NF4_SEARCH_STEPS if steps is None else steps
    if w.device.type == "cpu" and w.numel() % 2 == 0:
        from . import cpu_ext

        lib = cpu_ext.library(quiet=True)
        if lib is not None:
            flat = w.detach().reshape(-1).to(torch.float32).contiguous()
            code, bounds, order = F._4bit_search("nf4")
            order8 = order.to(torch.uint8)
            packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
            scales = torch.empty(-(-flat.numel() // g), dtype=torch.float32)
            err = F.ctypes_double()
            lib.effnb_nf4_search(flat.data_ptr(), flat.numel(), g, bounds.data_ptr(), order8.data_ptr(),
                                 code.data_ptr(), alpha, low, steps, packed.data_ptr(), scales.data_ptr(),
                                 F.ctypes_ref(err), cpu_ext.num_threads())
            return {"qweight": packed, "absmax": scales, "_sq_err": float(err.value)}
    return hqq_nf4_reference(w, g, alpha=alpha, low=low, steps=steps)


def hqq_nf4_reference(w: torch.Tensor, group_size: int, *, alpha: float = NF4_SEARCH_ALPHA,
                      low: float = NF4_SEARCH_LOW, steps: int = NF4_SEARCH_STEPS) -> dict:
    """PyTorch reference of ``hqq_nf4`` (whole blocks only: numel a multiple of group_size)."""
    code, bounds, order = F._4bit_search("nf4")
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


# ------------------------------------------------------------------------------------------ gptq


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


def gptq(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int, *, damp: float = 0.01,
         symmetric: bool = False, block: int = 128, factor=None) -> dict:
    """GPTQ: columns rounded one by one, each rounding error spread over the columns not yet
    rounded through the inverse Hessian of the layer's calibration inputs (H = X^T X).

    The grid (scale and zero of each group) is fixed before the loop ("static groups"): HQQ's
    optimised grid on the original weights for asymmetric int4, the range for symmetric int4 and
    int8. The column loop runs in effnb's compiled CPU routine when available (rows in parallel),
    else in the PyTorch loop below (same arithmetic). ``factor``: a precomputed
    ``gptq_inverse_factor(hessian, damp)``.
    """
    qmin, qmax = (-127.0, 127.0) if bits == 8 else (0.0, 15.0)
    N, K = w.shape
    g = group_size or K
    G = K // g
    Hinv, dead = factor if factor is not None else gptq_inverse_factor(hessian, damp)
    W = w.float().clone()
    W[:, dead] = 0
    if bits == 8:
        grid = rtn(W, "int8", g)
        scales16, zeros16, zconst = grid["scales"], None, 0.0
    elif symmetric:
        scales16, zeros16, zconst = F.int4_params_minmax(W, g, True)[0], None, 8.0
    else:
        grid = hqq(W, 4, g)
        scales16, zeros16, zconst = grid["scales"], grid["zeros"], 0.0
    scales = scales16.float().contiguous()
    zeros = zeros16.float().contiguous() if zeros16 is not None else None
    Q = torch.empty(N, K)
    from . import cpu_ext

    lib = cpu_ext.library(quiet=True) if w.device.type == "cpu" else None
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        B = i2 - i1
        W1 = W[:, i1:i2].contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        Q1 = torch.empty(N, B)
        Err1 = torch.empty(N, B)
        if lib is not None:
            lib.effnb_gptq_block(W1.data_ptr(), N, B, Hinv1.data_ptr(), scales.data_ptr(),
                                 zeros.data_ptr() if zeros is not None else None, zconst, G, g, i1, qmin, qmax,
                                 Q1.data_ptr(), Err1.data_ptr(), cpu_ext.num_threads())
        else:
            for i in range(B):
                gi = (i1 + i) // g
                s = scales[:, gi]
                z = zeros[:, gi] if zeros is not None else zconst
                wcol = W1[:, i]
                q = torch.round(wcol / s + z).clamp_(qmin, qmax)
                Q1[:, i] = q
                err = (wcol - (q - z) * s) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if bits == 8:
        return {"qweight": Q.to(torch.int8), "scales": scales16}
    return {"qweight": F.pack_int4(Q.to(torch.uint8)), "scales": scales16, "zeros": zeros16}
