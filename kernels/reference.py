"""Pure-PyTorch references of effnb's storage formats: pack, quantize (round to nearest), dequantize.

These are the canonical layouts the CPU kernels (``kernels/cpu/qlinear.cpp``) and the GPU kernels
(``kernels/triton``) read, and what every kernel is tested against. W is [N = out_features,
K = in_features]; y = x @ W.T. Which buffers each format stores, and its rules, are in the Format
table (``formats.py``); this module holds only the arithmetic.

int4   qweight uint8 [N, K/2]: column 2j in the LOW nibble, 2j+1 in the HIGH nibble; codes 0..15.
       scales fp16 [N, K/g]; zeros fp16 [N, K/g] in code units (float, so HQQ/GPTQ zeros fit),
       or None for symmetric (z = 8).                            w = (q - z) * s
int8   qweight int8 [N, K]; scales fp16 [N, K/g] (g = K: per channel).     w = q * s
nf4/fp4  bitsandbytes' layout: W flattened row-major, blocks of ``blocksize``; absmax fp32 per
       block; 4-bit indices into bnb's 16-entry table, packed uint8 [N*K/2] with element 2i in
       the HIGH nibble and 2i+1 LOW. Double quantization = bnb's ``compress_statistics``:
       absmax - mean offset, 8-bit blockwise dynamic code, block 256.    w = table[q] * absmax
fp8    qweight float8_e4m3fn [N, K]; scales fp32 [N, K/g].               w = float(q) * s

Scales are stored in fp16 (int4/int8) because at group 64 an fp32 scale and zero would cost a
full bit per weight; the quantizers round the scale (and zero) to fp16 *before* choosing codes,
so the stored codes are optimal for the stored scales.
"""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F

from .formats import DQ_BLOCKSIZE, FORMATS, get_format

NF4_TABLE, FP4_TABLE = FORMATS["nf4"].table, FORMATS["fp4"].table  # bitsandbytes' tables, value for value
SCALE_DTYPE = torch.float16
FP8_MAX = 448.0
FP16_TINY = 2.0 ** -24  # smallest positive fp16: a scale below it would be stored as 0
_LITTLE_ENDIAN = sys.byteorder == "little"
ctypes_double, ctypes_ref = ctypes.c_double, ctypes.byref  # the C quantizers report their error this way


def table_4bit(quant_type: str) -> torch.Tensor:
    """bitsandbytes' 16-entry table of ``quant_type`` ("nf4" or "fp4") as fp32."""
    return torch.tensor(get_format(quant_type).table, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ int4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (0..15) -> [N, K/2]; column 2j low nibble, 2j+1 high nibble."""
    q = q.to(torch.uint8).contiguous()
    if _LITTLE_ENDIAN:  # each byte pair read as one int16 (a + 256 b): two contiguous passes, no strides
        v = q.view(torch.int16)
        return ((v | (v >> 4)) & 0xFF).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] -> codes uint8 [N, K]."""
    if _LITTLE_ENDIAN:
        p = packed.contiguous().to(torch.int16)
        return ((p & 0x0F) | ((p & 0xF0) << 4)).view(torch.uint8)
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:  # [N, K] -> [N, K/g, g]
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g: int) -> torch.Tensor:
    """Nearest codes for fixed (stored) scales and zeros: uint8 [N, K]."""
    s = scales.float().unsqueeze(-1)
    q = _grouped(w.float(), g) / s
    q = (q.add_(zeros.float().unsqueeze(-1)) if zeros is not None else q.add_(8.0)).round_().clamp_(0, 15)
    return q.reshape(w.shape).to(torch.uint8)


def int4_params_minmax(w: torch.Tensor, g: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales/zeros from each group's range, already rounded to fp16."""
    wg = _grouped(w.float(), g)
    if symmetric:  # codes 0..15 around z = 8: [-8, 7] * s covers [min, max]
        s = torch.maximum(wg.amin(-1).neg() / 8, wg.amax(-1) / 7)
        s = torch.where(s > 0, s, torch.ones_like(s)).clamp_(min=FP16_TINY)
        return s.to(SCALE_DTYPE), None
    lo, hi = torch.aminmax(wg, dim=-1)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s)).clamp_(min=FP16_TINY).to(SCALE_DTYPE)
    z = (-lo / s.float()).to(SCALE_DTYPE)  # float zero in code units: min maps to code 0 exactly
    return s, z


def quantize_int4(w: torch.Tensor, g: int, symmetric: bool = False) -> dict:
    s, z = int4_params_minmax(w, g, symmetric)
    return {"qweight": pack_int4(int4_codes(w, s, z, g)), "scales": s, "zeros": z}


def dequantize_int4(qweight, scales, zeros, g: int) -> torch.Tensor:
    q = _grouped(unpack_int4(qweight).float(), g)
    q = q.sub_(zeros.float().unsqueeze(-1)) if zeros is not None else q.sub_(8.0)
    return q.mul_(scales.float().unsqueeze(-1)).reshape(qweight.shape[0], -1)


# ------------------------------------------------------------------------------------------ int8


def quantize_int8(w: torch.Tensor, g: int) -> dict:
    wg = _grouped(w.float(), g)
    s = (wg.abs().amax(-1) / 127).to(SCALE_DTYPE)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (wg / s.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return {"qweight": q.reshape(w.shape), "scales": s}


def dequantize_int8(qweight, scales, g: int) -> torch.Tensor:
    return _grouped(qweight.float(), g).mul_(scales.float().unsqueeze(-1)).reshape(qweight.shape)


# ------------------------------------------------------------------------------------------- fp8


def quantize_fp8(w: torch.Tensor, g: int) -> dict:
    wg = _grouped(w.float(), g)
    s = wg.abs().amax(-1) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (wg / s.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"qweight": q.reshape(w.shape), "scales": s}


def dequantize_fp8(qweight, scales, g: int) -> torch.Tensor:
    return (_grouped(qweight.float(), g) * scales.unsqueeze(-1)).reshape(qweight.shape)


# ---------------------------------------------------------------- nf4 / fp4 (bitsandbytes layout)


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantize_4bit, same arithmetic: (packed uint8 [numel/2], absmax fp32 [blocks])."""
    packed, absmax, _ = quantize_4bit_with_error(w, blocksize, quant_type)
    return packed, absmax


def bucket_search(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table, midpoints between the sorted table values, sorted position -> table index)."""
    code = table_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    return code, (code[order[:-1]] + code[order[1:]]) / 2, order


def quantize_4bit_with_error(w: torch.Tensor, blocksize: int, quant_type: str):
    """``quantize_4bit`` plus the sum of squared weight errors (None from the PyTorch path).

    Uses effnb's compiled CPU routine when it is available (same bytes, ~20x faster than
    ``torch.bucketize`` on a 2-core CPU); the PyTorch code below is the reference it is tested against.
    """
    if w.device.type == "cpu" and w.numel() % 2 == 0:
        from . import cpu

        lib = cpu.library(quiet=True)
        if lib is not None:
            flat = w.detach().reshape(-1).to(torch.float32).contiguous()
            code, bounds, order = bucket_search(quant_type)
            order8 = order.to(torch.uint8)
            packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
            absmax = torch.empty(-(-flat.numel() // blocksize), dtype=torch.float32)
            err = ctypes_double()
            lib.effnb_quantize_4bit(flat.data_ptr(), flat.numel(), blocksize, bounds.data_ptr(), order8.data_ptr(),
                                    code.data_ptr(), packed.data_ptr(), absmax.data_ptr(), ctypes_ref(err),
                                    cpu.num_threads())
            return packed, absmax, float(err.value)
    return (*quantize_4bit_reference(w, blocksize, quant_type), None)


def _blockwise_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise normalisation: (per-block absmax, values / absmax clamped to [-1, 1]).

    The last block may be short. The full blocks multiply by the reciprocal (as bitsandbytes'
    kernels do) and the short one divides: the stored bytes depend on that rounding.
    """
    n = flat.numel()
    full = n - n % blocksize
    amax, scaled = [], []
    if full:
        blocks = flat[:full].reshape(-1, blocksize)
        amax.append(blocks.abs().max(dim=-1)[0])
        scaled.append(torch.clamp(blocks * (1.0 / amax[0].clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1))
    if n % blocksize:
        am = flat[full:].abs().max().clamp(min=1e-38)
        amax.append(am.unsqueeze(0))
        scaled.append(torch.clamp(flat[full:] / am, -1, 1))
    return torch.cat(amax), torch.cat(scaled)


def quantize_4bit_reference(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference of ``quantize_4bit`` (bitsandbytes' arithmetic with ``torch.bucketize``)."""
    _, bounds, order = bucket_search(quant_type)
    absmax, scaled = _blockwise_scaled(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    q8 = order[torch.bucketize(scaled, bounds, out_int32=True)].to(torch.uint8)  # sorted position -> code
    return (q8[::2] << 4) | q8[1::2], absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 weights of shape ``shape`` from bitsandbytes-layout 4-bit bytes and per-block absmax."""
    code = table_4bit(quant_type).to(packed.device)
    # one gather per byte: a 256-entry table of (high-nibble value, low-nibble value) pairs
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # [256, 2]
    n = 1
    for d in shape:
        n *= d
    vals = pairs[packed.reshape(-1).long()].reshape(-1)[:n]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if n % blocksize:
        out[full:] = vals[full:] * absmax[-1]
    return out.reshape(shape)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: the 8-bit code for double quantization."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        bnd = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bnd[:-1] + bnd[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    values = torch.tensor(data, dtype=torch.float32)
    values = torch.cat([values, torch.zeros(256 - values.numel())])
    return values.sort().values


def double_quant(absmax: torch.Tensor) -> dict:
    """Compress fp32 absmax as bitsandbytes' ``compress_statistics`` does."""
    code = dynamic_code()
    offset = absmax.mean()
    amax2, scaled = _blockwise_scaled(absmax - offset, DQ_BLOCKSIZE)
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return {"qabsmax": q, "absmax2": amax2, "code2": code, "offset": offset.reshape(1)}


def undo_double_quant(qabsmax, absmax2, code2, offset) -> torch.Tensor:
    vals = code2[qabsmax.long()]
    scale = absmax2.repeat_interleave(DQ_BLOCKSIZE)[: vals.numel()]
    return vals * scale + offset


# ------------------------------------------------------------------------------------- linear


def dequantize(fmt: str, qweight: torch.Tensor, *, n: int, k: int, group: int, scales=None, zeros=None,
               absmax=None, dq=None) -> torch.Tensor:
    """W [n, k] in fp32 from the canonical tensors (``dq`` = (qabsmax, absmax2, code2, offset))."""
    tensors = {"qweight": qweight, "scales": scales, "zeros": zeros, "absmax": absmax}
    if dq is not None:
        tensors.update(zip(("qabsmax", "absmax2", "code2", "offset"), dq))
    return get_format(fmt).dequantize(tensors, group, (n, k))


def reference_linear(fmt: str, x: torch.Tensor, qweight: torch.Tensor, *, n: int, k: int, group: int,
                     scales=None, zeros=None, absmax=None, dq=None, bias=None) -> torch.Tensor:
    """y = x @ W.T + bias computed in fp32 (float64 for float64 x), returned in x's dtype."""
    return linear(x, dequantize(fmt, qweight, n=n, k=k, group=group, scales=scales, zeros=zeros, absmax=absmax,
                                dq=dq), bias)


def linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ w.T + bias computed in fp32 (float64 for float64 x), returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = bias.to(acc) if bias is not None else None
    return F.linear(x.to(acc), w.to(device=x.device, dtype=acc), b).to(x.dtype)
