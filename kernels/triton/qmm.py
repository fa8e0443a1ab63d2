"""Triton kernels: fused dequantize + matmul for int4, int8 and 4-bit table formats (nf4/fp4).

One kernel body, ``_qmm``, covers every format (``FMT`` is a compile-time constant, so each
format compiles to its own specialised kernel). Each program owns a tile of BLOCK_M input rows x
BLOCK_N output features and walks K in steps of BLOCK_K:

    load the packed weight bytes of the tile       (the only large read: 0.5 byte per weight)
    split each byte into its two 4-bit codes       (even column / odd column)
    turn codes into values                          int4: (q - z) * s    nf4/fp4: table[q] * absmax
    multiply with the matching activation columns   and accumulate in fp32

The weight tile is never written anywhere: dequantized values live only in registers, which is
why the kernel reads about a quarter of the bytes an fp16 matmul reads.

Two shapes of the same kernel (chosen in ``plan``):
  * GEMV (``USE_DOT=False``, M <= 4): broadcast-multiply-and-sum on the CUDA cores; optional
    split-K (several programs per output tile, combined with atomic adds) so a small N still
    fills every multiprocessor.
  * tiled GEMM (``USE_DOT=True``): ``tl.dot`` on the tensor cores, for 5..16 rows and prefill.
A third path, dequantize into a scratch fp16/bf16 matrix (``_dequant``) and call cuBLAS, is
used for large M where it wins (see ``plan``).

With ``TRITON_INTERPRET=1`` set before triton is imported, the same kernels run on CPU tensors
under Triton's interpreter (NumPy, slow, exact enough to check against the reference): that is
how the tests and notebook 05 run them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effnb.torch_utils import triton_interpreting

FMT_INT4, FMT_INT8, FMT_LUT4 = 0, 1, 2
DQ_BLOCK = 256  # bitsandbytes' block for the double-quantized absmax
POISON = False  # tests set this: outputs start as NaN so unwritten elements show up


DQ_BLOCK_C = tl.constexpr(DQ_BLOCK)  # a global the kernels may read


@triton.jit
def _tile_scales(s_ptr, q2_ptr, c2_ptr, a2_ptr, off_ptr, rn, n_ok, k0, KG, GROUP: tl.constexpr, NG: tl.constexpr,
                 DQ: tl.constexpr):
    """(scales fp32 [BLOCK_N, NG], their indices, their mask) of the tile starting at column k0
    (tiles start on a group boundary)."""
    gk = k0 // GROUP + tl.arange(0, NG)
    g_ok = n_ok[:, None] & (gk[None, :] < KG)
    gidx = rn[:, None] * KG + gk[None, :]
    if DQ:  # bitsandbytes double quantization: absmax = code2[q] * absmax2[block // 256] + offset
        qa = tl.load(q2_ptr + gidx, mask=g_ok, other=0).to(tl.int32)
        s = tl.load(c2_ptr + qa) * tl.load(a2_ptr + gidx // DQ_BLOCK_C, mask=g_ok, other=0.0)
        s = s + tl.load(off_ptr)
    else:
        s = tl.load(s_ptr + gidx, mask=g_ok, other=0.0).to(tl.float32)
    return s, gidx, g_ok


@triton.jit
def _zeros(z_ptr, gidx, g_ok, HAS_Z: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    """int4 zero points of a tile's groups (8 when the weight is symmetric)."""
    if HAS_Z:
        z = tl.load(z_ptr + gidx, mask=g_ok, other=0.0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N, NG), 8.0, tl.float32)
    return z


@triton.jit
def _lut_values(tab_ptr, hi, lo, s, BLOCK_N: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
                HALF: tl.constexpr):
    """nf4/fp4 (bitsandbytes): element 2i in the HIGH nibble, 2i+1 low; w = table[q] * absmax."""
    ev = tl.reshape(tl.reshape(tl.load(tab_ptr + hi), (BLOCK_N, NG, GS // 2)) * s[:, :, None], (BLOCK_N, HALF))
    od = tl.reshape(tl.reshape(tl.load(tab_ptr + lo), (BLOCK_N, NG, GS // 2)) * s[:, :, None], (BLOCK_N, HALF))
    return ev, od


@triton.jit
def _mma(acc, a, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ w.T: activations a [BLOCK_M, BK] times fp32 weights w [BLOCK_N, BK]."""
    if USE_DOT:
        wt = tl.trans(w.to(a.dtype))
        if EMU:  # the interpreter's bf16 dot multiplies raw bits: same rounding, fp32 math
            acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, wt, input_precision="ieee")
        else:
            acc += tl.dot(a, wt)
    else:  # GEMV: broadcast-multiply-and-sum on the CUDA cores
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _qmm_step(acc, xk, w_ptr, z_ptr, tab_ptr, s, gidx, g_ok, rn, n_ok, rk, k_ok, k0, k_hi, stride_wn,
              FMT: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
              EMU: tl.constexpr, EVEN_K: tl.constexpr):
    """One BLOCK_K step: dequantize the tile's weights (in registers only) and accumulate."""
    HALF: tl.constexpr = BLOCK_K // 2
    if FMT == 1:
        # ---- int8: [BLOCK_N, BLOCK_K] bytes, one value each
        q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        w = tl.reshape(tl.reshape(q.to(tl.float32), (BLOCK_N, NG, GS)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        acc = _mma(acc, xk, w, USE_DOT, IEEE, EMU)
    else:
        # ---- 4-bit: [BLOCK_N, BLOCK_K/2] bytes, two codes each
        rj = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, HALF), HALF), HALF)
        if EVEN_K:
            j_ok = tl.full((HALF,), 1, tl.int1)
        else:
            j_ok = rj < k_hi // 2
        byte = tl.load(w_ptr + rn[:, None] * stride_wn + rj[None, :], mask=n_ok[:, None] & j_ok[None, :],
                       other=0).to(tl.int32)
        lo = byte & 0xF
        hi = (byte >> 4) & 0xF
        if FMT == 0:  # int4: column 2j low nibble, 2j+1 high; w = q * s - z * s
            zs = _zeros(z_ptr, gidx, g_ok, HAS_Z, BLOCK_N, NG) * s
            ev = tl.reshape(tl.reshape(lo.to(tl.float32), (BLOCK_N, NG, GS // 2)) * s[:, :, None]
                            - zs[:, :, None], (BLOCK_N, HALF))
            od = tl.reshape(tl.reshape(hi.to(tl.float32), (BLOCK_N, NG, GS // 2)) * s[:, :, None]
                            - zs[:, :, None], (BLOCK_N, HALF))
        else:
            ev, od = _lut_values(tab_ptr, hi, lo, s, BLOCK_N, NG, GS, HALF)
        xe, xo = tl.split(tl.reshape(xk, (BLOCK_M, HALF, 2)))  # even / odd columns of x
        acc = _mma(acc, xe, ev, USE_DOT, IEEE, EMU)
        acc = _mma(acc, xo, od, USE_DOT, IEEE, EMU)
    return acc


def _qmm(x_ptr, w_ptr, s_ptr, z_ptr, q2_ptr, c2_ptr, a2_ptr, off_ptr, tab_ptr, b_ptr, y_ptr,
         M, N, K, KG, stride_wn, stride_xm, stride_ym, k_per_split,
         FMT: tl.constexpr, HAS_Z: tl.constexpr, DQ: tl.constexpr, HAS_BIAS: tl.constexpr,
         GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr,
         EVEN_K: tl.constexpr):
    # GROUP: elements per scale (a power of two); KG: scales per weight row; stride_wn: bytes per
    # weight row. EVEN_K: every K tile is full, so loads along K need no mask and can be 16 bytes wide.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1  # scales per row in one tile
    GS: tl.constexpr = BLOCK_K // NG  # elements sharing one scale inside the tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        s, gidx, g_ok = _tile_scales(s_ptr, q2_ptr, c2_ptr, a2_ptr, off_ptr, rn, n_ok, k0, KG, GROUP, NG, DQ)
        # ---- activations [BLOCK_M, BLOCK_K], contiguous along K
        rk = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        if EVEN_K:
            k_ok = tl.full((BLOCK_K,), 1, tl.int1)
        else:
            k_ok = rk < k_hi
        xk = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _qmm_step(acc, xk, w_ptr, z_ptr, tab_ptr, s, gidx, g_ok, rn, n_ok, rk, k_ok, k0, k_hi, stride_wn,
                        FMT, HAS_Z, BLOCK_M, BLOCK_N, BLOCK_K, NG, GS, USE_DOT, IEEE, EMU, EVEN_K)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:  # y is an fp32 buffer zeroed by the launcher
        tl.atomic_add(y_off, acc, mask=y_ok)
    else:
        tl.store(y_off, acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def _dequant(w_ptr, s_ptr, z_ptr, q2_ptr, c2_ptr, a2_ptr, off_ptr, tab_ptr, out_ptr, N, K, KG,
             FMT: tl.constexpr, HAS_Z: tl.constexpr, DQ: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Write W [N, K] in out's dtype: the first half of the dequantize-then-cuBLAS path."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = rn < N
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1
    GS: tl.constexpr = BLOCK_K // NG
    HALF: tl.constexpr = BLOCK_K // 2
    s, gidx, g_ok = _tile_scales(s_ptr, q2_ptr, c2_ptr, a2_ptr, off_ptr, rn, n_ok, k0, KG, GROUP, NG, DQ)
    rk = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    if EVEN_K:
        ok = n_ok[:, None] & tl.full((1, BLOCK_K), 1, tl.int1)
    else:
        ok = n_ok[:, None] & (rk < K)[None, :]
    if FMT == 1:
        q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=ok, other=0)
        w = tl.reshape(tl.reshape(q.to(tl.float32), (BLOCK_N, NG, GS)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        rj = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, HALF), HALF), HALF)
        if EVEN_K:
            j_ok = n_ok[:, None] & tl.full((1, HALF), 1, tl.int1)
        else:
            j_ok = n_ok[:, None] & (rj < K // 2)[None, :]
        byte = tl.load(w_ptr + rn[:, None] * (K // 2) + rj[None, :], mask=j_ok, other=0).to(tl.int32)
        lo = byte & 0xF
        hi = (byte >> 4) & 0xF
        if FMT == 0:  # w = (q - z) * s
            z = _zeros(z_ptr, gidx, g_ok, HAS_Z, BLOCK_N, NG)
            ev = tl.reshape((tl.reshape(lo.to(tl.float32), (BLOCK_N, NG, GS // 2)) - z[:, :, None]) * s[:, :, None],
                            (BLOCK_N, HALF))
            od = tl.reshape((tl.reshape(hi.to(tl.float32), (BLOCK_N, NG, GS // 2)) - z[:, :, None]) * s[:, :, None],
                            (BLOCK_N, HALF))
        else:
            ev, od = _lut_values(tab_ptr, hi, lo, s, BLOCK_N, NG, GS, HALF)
        w = tl.reshape(tl.join(ev, od), (BLOCK_N, BLOCK_K))  # interleave: column 2j, then 2j + 1
        tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)




def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported (effnb.kernels.use_interpreter() does it)")


QMM = triton.jit(_qmm)
DEQUANT = triton.jit(_dequant)


def launch_qmm(fmt: int, x2: torch.Tensor, w: torch.Tensor, n: int, k: int, group: int, kg: int, *,
               scales=None, zeros=None, dq=None, table=None, bias=None, block_m: int, block_n: int,
               block_k: int, split_k: int, use_dot: bool, num_warps: int = 4, num_stages: int = 3):
    """y [M, N] = x2 [M, K] @ dequant(W).T (+ bias), x2 contiguous. ``dq`` = (qabsmax, absmax2, code2, offset), as DoubleQuant."""
    m = x2.shape[0]
    dev = x2.device
    split_k = max(1, min(split_k, triton.cdiv(k, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=dev)
    else:
        y = torch.empty(m, n, dtype=x2.dtype, device=dev)
        if POISON:
            y.fill_(float("nan"))
    dummy = w  # any tensor: pointers of absent operands are never read
    q2, a2, c2, off = dq if dq is not None else (dummy, dummy, dummy, dummy)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    kwargs = {} if dev.type == "cpu" else {"num_warps": num_warps, "num_stages": num_stages}
    _check_device(dev)
    QMM[grid](
        x2, w, scales if scales is not None else dummy, zeros if zeros is not None else dummy,
        q2, c2, a2, off, table if table is not None else dummy, bias if bias is not None else dummy, y,
        m, n, k, kg, k if fmt == FMT_INT8 else k // 2, x2.stride(0), y.stride(0), k_per_split,
        FMT=fmt, HAS_Z=zeros is not None, DQ=dq is not None, HAS_BIAS=bias is not None, GROUP=group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, USE_DOT=use_dot,
        IEEE=x2.dtype == torch.float32,
        EMU=triton_interpreting() and x2.dtype == torch.bfloat16, EVEN_K=k % block_k == 0, **kwargs)
    return y if split_k == 1 else y.to(x2.dtype)


def launch_dequant(fmt: int, w: torch.Tensor, n: int, k: int, group: int, kg: int, dtype: torch.dtype, *,
                   scales=None, zeros=None, dq=None, table=None, block_n: int = 32, block_k: int = 128,
                   num_warps: int = 4) -> torch.Tensor:
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    if POISON:
        out.fill_(float("nan"))
    dummy = w
    q2, a2, c2, off = dq if dq is not None else (dummy, dummy, dummy, dummy)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    kwargs = {} if w.device.type == "cpu" else {"num_warps": num_warps}
    _check_device(w.device)
    DEQUANT[grid](
        w, scales if scales is not None else dummy, zeros if zeros is not None else dummy, q2, c2, a2, off,
        table if table is not None else dummy, out, n, k, kg,
        FMT=fmt, HAS_Z=zeros is not None, DQ=dq is not None, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, **kwargs)
    return out
