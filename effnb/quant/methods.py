"""The quantization methods: one registry entry each, saying what the method needs and produces.

    get_method("hqq").format(cfg)              # "nf4": the storage format it writes for this config
    get_method("gptq").quantize(w, cfg, H)     # ("int4", {"qweight": ..., "scales": ..., "zeros": ...})
    get_method("nf4").label(cfg)               # "nf4-g64": the variant's name in reports

int8, int4, nf4, fp4, fp8  round to nearest in that format (``rounding.rtn``)
hqq       calibration-free optimisation of the grid (``hqq.py``): NF4 codes with searched block scales
          (grid "nf4", the default) or the HQQ paper's int4 zero-points (grid "int4")
gptq      second-order error feedback from calibration inputs (``gptq.py``)
llm.int8  bitsandbytes' LLM.int8(): bitsandbytes quantizes it when the layer is built, so ``quantize``
          returns no tensors

The front ends, ``QuantConfig`` and the quantize loop ask this table instead of testing method names.
No torch import here (``QuantConfig`` reads the table when it is built); the algorithms load on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..options import did_you_mean


@dataclass(frozen=True)
class Method:
    """What ``effnb.quantize`` needs to know about one method.

    ``group_rule``: how ``group_size`` is read: "groups" (weights per scale along a row, 32-256, or 0 =
    per channel at 8 bits), "blocksize" (bitsandbytes' block over the flattened weight) or "unused".
    ``symmetric`` / ``double_quant`` / ``bitsandbytes``: whether the method takes those options and can
    run on ``backend="bitsandbytes"``.
    """

    name: str
    formats: tuple[str, ...]
    bits: tuple[int, ...]
    calibrated: bool = False
    bitsandbytes_only: bool = False
    group_rule: str = "groups"
    symmetric: bool = False
    double_quant: bool = False
    bitsandbytes: bool = False
    choose: Callable | None = None  # cfg -> format name, where the method has several formats
    run: Callable | None = None     # (fmt, w, cfg, hessian, cache) -> buffers (None: bitsandbytes quantizes)

    def format(self, cfg) -> str:
        """The storage format this method writes for ``cfg``."""
        return self.choose(cfg) if self.choose is not None else self.formats[0]

    def quantize(self, w, cfg, hessian=None, *, cache: dict | None = None) -> tuple[str, dict | None]:
        """(format name, buffers) for one fp32 weight [N, K]; the buffers may hold "_sq_err", the squared
        error when the quantizer measured it. ``hessian``: the layer's X^T X (calibrated methods);
        ``cache``: the caller's, where a factorisation is kept for the next layer with the same Hessian."""
        fmt = self.format(cfg)
        return fmt, self.run(fmt, w, cfg, hessian, cache if cache is not None else {})

    def label(self, cfg) -> str:
        """The variant's name in reports, e.g. "nf4-g64" (no group for a method that ignores it)."""
        return self.name if self.group_rule == "unused" else f"{self.name}-g{cfg.group_size}"


# ------------------------------------------------------------------------------------- runners


def _rtn(fmt, w, cfg, hessian, cache):
    from . import rounding

    return rounding.rtn(w, fmt, cfg.group_size, symmetric=cfg.symmetric, double_quant=cfg.double_quant)


def _hqq_nf4(fmt, w, cfg, hessian, cache):
    from . import hqq

    return hqq.hqq_nf4(w, cfg.group_size)


def _hqq_int(fmt, w, cfg, hessian, cache):
    from . import hqq

    return hqq.hqq(w, cfg.bits, cfg.group_size, iters=cfg.hqq_iters, symmetric=cfg.symmetric)


_HQQ_BY_FORMAT = {"nf4": _hqq_nf4, "int4": _hqq_int, "int8": _hqq_int}


def _hqq(fmt, w, cfg, hessian, cache):
    return _HQQ_BY_FORMAT[fmt](fmt, w, cfg, hessian, cache)


def _gptq(fmt, w, cfg, hessian, cache):
    from . import gptq

    if cache.get("hessian") is not hessian:  # q/k/v and gate/up share one Hessian: factorised once
        cache.update(hessian=hessian, factor=gptq.gptq_inverse_factor(hessian, cfg.gptq_damp))
    return gptq.gptq(w, hessian, cfg.bits, cfg.group_size, damp=cfg.gptq_damp, symmetric=cfg.symmetric,
                     factor=cache["factor"])


def _bitsandbytes(fmt, w, cfg, hessian, cache):
    return None  # bitsandbytes' Int8Params quantizes the float weight itself


def _int_by_bits(cfg) -> str:
    return "int4" if cfg.bits == 4 else "int8"


def _hqq_format(cfg) -> str:
    nf4_grid = cfg.bits == 4 and cfg.hqq_grid == "nf4" and not cfg.symmetric
    return "nf4" if nf4_grid else _int_by_bits(cfg)


_ROUNDED = dict(run=_rtn)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("int8", ("int8",), (8,), bitsandbytes=True, **_ROUNDED),
    Method("int4", ("int4",), (4,), symmetric=True, **_ROUNDED),
    Method("nf4", ("nf4",), (4,), group_rule="blocksize", double_quant=True, bitsandbytes=True, **_ROUNDED),
    Method("fp4", ("fp4",), (4,), group_rule="blocksize", double_quant=True, bitsandbytes=True, **_ROUNDED),
    Method("hqq", ("nf4", "int4", "int8"), (4, 8), symmetric=True, choose=_hqq_format, run=_hqq),
    Method("gptq", ("int4", "int8"), (4, 8), calibrated=True, symmetric=True, choose=_int_by_bits, run=_gptq),
    Method("fp8", ("fp8",), (8,), **_ROUNDED),
    Method("llm.int8", ("int8",), (8,), bitsandbytes_only=True, group_rule="unused", bitsandbytes=True,
           run=_bitsandbytes),
)}


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (case-insensitive); ValueError naming the methods otherwise."""
    method = METHODS.get(name.lower()) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unknown quantization method {name!r}{did_you_mean(name, METHODS, cutoff=0.5)} "
                         f"(methods: {', '.join(METHODS)})")
    return method

