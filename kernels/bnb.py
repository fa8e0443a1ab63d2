"""bitsandbytes interop: effnb's nf4/fp4/int8 tensors <-> bitsandbytes modules, both directions.

effnb's nf4/fp4 bytes *are* bitsandbytes' bytes (reference.py), so conversion only rewraps tensors:
no requantization, and either side reads the other's weights exactly.

bitsandbytes' CPU layout (read in bitsandbytes 0.50.2). On a CPU whose native library reports AVX512-BF16
(``bitsandbytes.functional.has_avx512bf16()``, read once per layer into
``Linear4bit.support_avx512bf16_for_cpu`` by ``Linear4bit.__init__``), the first forward of a
``Linear4bit`` on CPU in eval mode with an input that needs no gradient calls
``functional._convert_weight_packed_for_cpu``: it rewrites ``weight.data`` from the canonical bytes
(``[N*K/2, 1]``, element 2j in the high nibble) into ``[N, K/2]``: each 32 bytes hold a tile of 32
rows x 2 columns (64 codes, row-major), code i in byte i's low nibble and code 32+i in its high
nibble, tiles ordered by row block, then column pair), replaces the per-block ``absmax`` (nested or not) by a bfloat16
``[K/blocksize, N]`` transpose, sets ``quant_state.dtype = bfloat16`` and
``quant_state.packing_format_for_cpu = True``; ``matmul_4bit`` then runs its bfloat16 kernel
(``gemv_4bit``) whatever ``compute_dtype`` says. Anything that reads ``weight.data`` with
``quant_state`` as canonical bytes (``functional.dequantize_4bit``, PEFT's merge) decodes garbage.
``Linear4bit._save_to_state_dict`` undoes it with ``_convert_weight_packed_for_cpu_inverse``, which
leaves a non-nested ``absmax`` transposed (``[K/blocksize, N]``) while clearing the flag, so a
``state_dict()`` after a forward corrupts a non-nested layer's next forward. effnb reads all three
layouts (``canonical_4bit``), puts layers back with ``restore_layout`` (what ``merge`` does before
PEFT dequantizes), and gives the layers it builds (and ``guard_layout``'s) a state-dict pre-hook
that restores the layout correctly before bitsandbytes' own inverse would run.
"""

from __future__ import annotations

import logging

import torch

from .formats import get_format

log = logging.getLogger(__name__)

_CPU_BLOCK_N = 32  # rows per tile of bitsandbytes' CPU layout (its ``block_n`` default)


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # optional dependency: say how to get it
        raise ImportError("this needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from exc
    return bnb


def quant_state(tensors: dict, fmt: str, blocksize: int, shape: tuple[int, int], dtype: torch.dtype):
    """A bitsandbytes QuantState over effnb's nf4/fp4 tensors (shared, not copied)."""
    bnb = _bnb()
    from .reference import DQ_BLOCKSIZE, table_4bit

    QS = bnb.functional.QuantState
    code = table_4bit(fmt)
    if tensors.get("qabsmax") is not None:
        state2 = QS(absmax=tensors["absmax2"], code=tensors["code2"], blocksize=DQ_BLOCKSIZE, dtype=torch.float32)
        return QS(absmax=tensors["qabsmax"], shape=torch.Size(shape), code=code, blocksize=blocksize,
                  quant_type=fmt, dtype=dtype, offset=tensors["offset"].reshape(()), state2=state2)
    return QS(absmax=tensors["absmax"], shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type=fmt,
              dtype=dtype)


def to_bnb_module(w: torch.Tensor, bias, tensors: dict | None, *, fmt: str, group_size: int, k: int, n: int,
                  dtype=torch.float32, double_quant: bool = False, threshold: float = 0.0):
    """A bitsandbytes Linear4bit (a 4-bit table format, from effnb's ``tensors``) or Linear8bitLt
    (int8 from the weight ``w``; ``threshold`` > 0 keeps fp16 outliers: llm.int8)."""
    bnb = _bnb()
    dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if get_format(fmt).table:
        m = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=dtype, compress_statistics=double_quant,
                              quant_type=fmt, device="meta")
        qs = quant_state(tensors, fmt, group_size, (n, k), dtype)
        m.weight = bnb.nn.Params4bit(tensors["qweight"].reshape(-1, 1), requires_grad=False, quant_state=qs,
                                     blocksize=group_size, compress_statistics=double_quant,
                                     quant_type=fmt, bnb_quantized=True, module=m)
        guard_layout(m)
    else:  # int8 via bitsandbytes: row-wise absmax int8, plus fp16 outliers for llm.int8
        m = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, threshold=threshold,
                                device="meta")
        m.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    if bias is not None:
        m.bias = torch.nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
    return m


# ------------------------------------------------------------------ bitsandbytes' CPU 4-bit layouts


def is_repacked(m) -> bool:
    """True when bitsandbytes has rewritten this Linear4bit (or Params4bit) into its CPU tile layout."""
    w = getattr(m, "weight", m)
    return bool(getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False))


def layout(m) -> str:
    """Which layout a Linear4bit's bytes are in now: "canonical", "cpu-repacked" (bitsandbytes'
    AVX512-BF16 tiles) or "transposed-absmax" (canonical bytes with the ``[K/blocksize, N]`` absmax
    that bitsandbytes' own inverse leaves on a non-nested layer)."""
    qs = m.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        return "cpu-repacked"
    n, k = qs.shape
    if (not qs.nested and qs.absmax.dim() == 2 and tuple(qs.absmax.shape) == (k // qs.blocksize, n)
            and hasattr(qs, "original_qshape")):
        return "transposed-absmax"
    return "canonical"


def forward_dtype(m, x_dtype: torch.dtype = torch.float32, *, grad: bool = False) -> torch.dtype:
    """The dtype bitsandbytes computes this Linear4bit's next CPU forward in, in the layer's current mode.

    bfloat16 once the layer is repacked for the AVX512-BF16 kernel, or when this forward will repack
    it (layer in eval mode, input needing no gradient: ``grad=False``); else its ``compute_dtype``
    (or the input's dtype when none is set, as ``Linear4bit.set_compute_type``).
    """
    will_repack = (getattr(m, "support_avx512bf16_for_cpu", False) and m.weight.device.type == "cpu"
                   and not m.training and not grad)
    if is_repacked(m) or will_repack:
        return torch.bfloat16
    return m.compute_dtype or x_dtype


def unpack_cpu_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' CPU tiles ``[N, K/2]`` -> canonical bytes (flat, N*K/2): pure torch, exact."""
    b = _CPU_BLOCK_N
    p = packed.contiguous().view(torch.uint8).reshape(-1, b)  # 32 bytes = 64 codes: low nibbles, then high
    codes = torch.cat([p & 0xF, p >> 4], dim=1)  # [.., 64] in (row in tile, column pair) order
    codes = codes.reshape(n // b, k // 2, b, 2).transpose(1, 2).reshape(n, k)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).reshape(-1)


def canonical_4bit(m) -> tuple[dict, str, int, tuple[int, int]]:
    """The bytes and statistics a Linear4bit holds now, in bitsandbytes' canonical layout.

    Returns (tensors, quant_type, blocksize, (out, in)); tensors: ``qweight`` (flat uint8) and
    either ``absmax`` (fp32) or the nested ``qabsmax``/``absmax2``/``code2``/``offset``, as effnb's
    QuantLinear stores them. A repacked layer's codes come back exactly; its absmax is what
    bitsandbytes kept (bfloat16 values, widened to fp32 exactly). Shares tensors when nothing
    needs converting; never changes the layer.
    """
    qs = m.weight.quant_state
    if qs is None:
        raise ValueError(f"this {type(m).__name__} has no quant_state: bitsandbytes has not quantized it yet "
                         "(it does when the layer is moved to a device, e.g. .to('cpu'))")
    n, k = (int(d) for d in qs.shape)
    kind = layout(m)
    if kind == "cpu-repacked":
        q = unpack_cpu_codes(m.weight.data, n, k)
        return {"absmax": qs.absmax.T.reshape(-1).float(), "qweight": q}, qs.quant_type, qs.blocksize, (n, k)
    q = m.weight.data.reshape(-1).view(torch.uint8)
    if kind == "transposed-absmax":
        return {"absmax": qs.absmax.T.reshape(-1).float(), "qweight": q}, qs.quant_type, qs.blocksize, (n, k)
    if qs.nested:
        return ({"qweight": q, "qabsmax": qs.absmax, "absmax2": qs.state2.absmax, "code2": qs.state2.code,
                 "offset": torch.as_tensor(qs.offset, dtype=torch.float32).reshape(1)},
                qs.quant_type, qs.blocksize, (n, k))
    return {"qweight": q, "absmax": qs.absmax.float()}, qs.quant_type, qs.blocksize, (n, k)


def _restore_one(m) -> bool:
    kind = layout(m)
    if kind == "canonical":
        return False
    bnb = _bnb()
    qs = m.weight.quant_state
    t, fmt, blocksize, shape = canonical_4bit(m)
    dtype = getattr(qs, "original_dtype", None) or (m.compute_dtype or torch.float32)
    if getattr(qs, "original_nested", False):
        # the layer's declared format: absmax 8-bit again, as bitsandbytes' own inverse does (not bit-exact)
        absmax = t["absmax"]
        offset = absmax.mean()
        qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
        new = bnb.functional.QuantState(absmax=qabsmax, shape=torch.Size(shape), code=qs.code, blocksize=blocksize,
                                        quant_type=fmt, dtype=dtype, offset=offset, state2=state2)
    else:
        new = bnb.functional.QuantState(absmax=t["absmax"], shape=torch.Size(shape), code=qs.code,
                                        blocksize=blocksize, quant_type=fmt, dtype=dtype)
    q = t["qweight"].reshape(getattr(qs, "original_qshape", None) or (-1, 1))
    storage = getattr(qs, "original_storage_type", None)
    m.weight.data = q.view(storage) if storage is not None else q
    m.weight.quant_state = new
    if getattr(m, "quant_state", None) is not None:
        m.quant_state = new
    log.debug("bitsandbytes layer put back from %s to the canonical layout", kind)
    return True


def restore_layout(model) -> int:
    """Put every Linear4bit in ``model`` (a module or one layer) back into bitsandbytes' canonical
    layout, in place; returns how many layers changed. Non-nested layers keep their values exactly;
    nested ones get their absmax quantized to 8 bits again, as bitsandbytes' own inverse does.
    The next CPU eval forward repacks them again where bitsandbytes wants to."""
    bnb = _bnb()
    mods = [model] if isinstance(model, bnb.nn.Linear4bit) else [
        x for x in model.modules() if isinstance(x, bnb.nn.Linear4bit)]
    return sum(_restore_one(x) for x in mods if getattr(x.weight, "quant_state", None) is not None)


def _restore_before_state_dict(module, prefix, keep_vars) -> None:
    """State-dict pre-hook: runs before ``Linear4bit._save_to_state_dict`` (whose inverse of the CPU
    layout leaves a non-nested absmax transposed), so bitsandbytes finds the canonical layout."""
    if getattr(module.weight, "quant_state", None) is not None:
        _restore_one(module)


def guard_layout(model) -> int:
    """Give every Linear4bit in ``model`` (a module or one layer) effnb's state-dict pre-hook, once;
    returns how many layers got it. After it, ``state_dict()`` (effnb's measurements, saving,
    PEFT's adapter export) finds the canonical layout and leaves every weight as it was."""
    bnb = _bnb()
    mods = [model] if isinstance(model, bnb.nn.Linear4bit) else [
        x for x in model.modules() if isinstance(x, bnb.nn.Linear4bit)]
    added = 0
    for x in mods:
        if not getattr(x, "_effnb_layout_guard", False):
            x.register_state_dict_pre_hook(_restore_before_state_dict)
            x._effnb_layout_guard = True
            added += 1
    return added


def dequantize_bnb(m) -> torch.Tensor:
    """fp32 [out, in] weight of a bitsandbytes Linear4bit / Linear8bitLt, whatever layout it is in now."""
    bnb = _bnb()
    if isinstance(m, bnb.nn.Linear4bit):
        t, fmt, blocksize, shape = canonical_4bit(m)
        qs = quant_state(t, fmt, blocksize, shape, torch.float32)
        return bnb.functional.dequantize_4bit(t["qweight"].reshape(-1, 1), qs).float()
    cb, scb = m.weight.CB if m.weight.CB is not None else m.weight.data, m.weight.SCB
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def from_bnb_module(m, backend: str = "auto"):
    """effnb QuantLinear holding exactly a bitsandbytes layer's weights (nf4/fp4 in any layout, or int8 per channel)."""
    bnb = _bnb()
    from .linear import QuantLinear

    bias = m.bias.detach() if m.bias is not None else None
    if isinstance(m, bnb.nn.Linear4bit):
        t, fmt, blocksize, (n, k) = canonical_4bit(m)
        return QuantLinear(k, n, fmt, blocksize, t, bias, backend=backend, method=fmt)
    if getattr(m, "state", None) is not None and m.state.threshold > 0:
        raise ValueError("an llm.int8 layer (outlier threshold > 0) has no exact effnb equivalent; keep it in bitsandbytes")
    cb = m.weight.CB if m.weight.CB is not None else m.weight.data
    scales = (m.weight.SCB.float() / 127.0).unsqueeze(1)  # fp32 keeps it exact (runs the reference path)
    n, k = cb.shape
    return QuantLinear(k, n, "int8", k, {"qweight": cb, "scales": scales}, bias, backend=backend, method="int8")
