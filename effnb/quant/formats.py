"""Storage formats of quantized weights: pack, quantize (round to nearest), dequantize.

These are the canonical layouts the CPU kernels (``csrc/qlinear.cpp``) and the GPU kernels
(``effnb.kernels``) read. W is [N = out_features, K = in_features]; y = x @ W.T.

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

# bitsandbytes' tables, copied value for value (tests compare them with bitsandbytes').
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_TABLE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
    -0.25,
)
DQ_BLOCKSIZE = 256  # bitsandbytes' block for the double-quantized absmax
SCALE_DTYPE = torch.float16
FP8_MAX = 448.0
_LITTLE_ENDIAN = sys.byteorder == "little"
ctypes_double, ctypes_ref = ctypes.c_double, ctypes.byref


def table_4bit(quant_type: str) -> torch.Tensor:
    return torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE, dtype=torch.float32)


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


FP16_TINY = 2.0 ** -24  # smallest positive fp16: a scale below it would be stored as 0


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


def _4bit_search(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        from . import cpu_ext

        lib = cpu_ext.library(quiet=True)
        if lib is not None:
            flat = w.detach().reshape(-1).to(torch.float32).contiguous()
            code, bounds, order = _4bit_search(quant_type)
            order8 = order.to(torch.uint8)
            packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
            absmax = torch.empty(-(-flat.numel() // blocksize), dtype=torch.float32)
            err = ctypes_double()
            lib.effnb_quantize_4bit(flat.data_ptr(), flat.numel(), blocksize, bounds.data_ptr(), order8.data_ptr(),
                                    code.data_ptr(), packed.data_ptr(), absmax.data_ptr(), ctypes_ref(err),
                                    cpu_ext.num_threads())
            return packed, absmax, float(err.value)
    return (*quantize_4bit_reference(w, blocksize, quant_type), None)


def quantize_4bit_reference(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference of ``quantize_4bit`` (bitsandbytes' arithmetic with ``torch.bucketize``)."""
    code, bounds, order = _4bit_search(quant_type)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n % blocksize:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
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
    a = absmax - offset
    n = a.numel()
    full = n - n % DQ_BLOCKSIZE
    parts = [a[:full].reshape(-1, DQ_BLOCKSIZE)] if full else []
    amax2 = [p.abs().max(dim=-1)[0] for p in parts]
    scaled = [torch.clamp(parts[0] * (1.0 / amax2[0].clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)] if full else []
    if n % DQ_BLOCKSIZE:
        am = a[full:].abs().max().clamp(min=1e-38)
        amax2.append(am.unsqueeze(0))
        scaled.append(torch.clamp(a[full:] / am, -1, 1))
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(torch.cat(scaled), bounds, out_int32=True).to(torch.uint8)
    return {"qabsmax": q, "absmax2": torch.cat(amax2), "code2": code, "offset": offset.reshape(1)}


def undo_double_quant(qabsmax, absmax2, code2, offset) -> torch.Tensor:
    vals = code2[qabsmax.long()]
    scale = absmax2.repeat_interleave(DQ_BLOCKSIZE)[: vals.numel()]
    return vals * scale + offset
