"""bitsandbytes interop: effnb's nf4/fp4/int8 tensors <-> bitsandbytes modules, both directions.

effnb's nf4/fp4 bytes *are* bitsandbytes' bytes (formats.py), so conversion only rewraps tensors:
no requantization, and either side reads the other's weights exactly.
"""

from __future__ import annotations

import torch


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # optional dependency: say how to get it
        raise ImportError("this needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from exc
    return bnb


def quant_state(tensors: dict, fmt: str, blocksize: int, shape: tuple[int, int], dtype: torch.dtype):
    """A bitsandbytes QuantState over effnb's nf4/fp4 tensors (shared, not copied)."""
    bnb = _bnb()
    from . import formats as F

    QS = bnb.functional.QuantState
    code = F.table_4bit(fmt)
    if tensors.get("qabsmax") is not None:
        state2 = QS(absmax=tensors["absmax2"], code=tensors["code2"], blocksize=F.DQ_BLOCKSIZE, dtype=torch.float32)
        return QS(absmax=tensors["qabsmax"], shape=torch.Size(shape), code=code, blocksize=blocksize,
                  quant_type=fmt, dtype=dtype, offset=tensors["offset"].reshape(()), state2=state2)
    return QS(absmax=tensors["absmax"], shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type=fmt,
              dtype=dtype)


def to_bnb_module(w: torch.Tensor, bias, cfg, tensors: dict | None, k: int, n: int, dtype=torch.float32):
    """A bitsandbytes Linear4bit (nf4/fp4, from effnb's tensors) or Linear8bitLt (int8, llm.int8)."""
    bnb = _bnb()
    dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if cfg.method in ("nf4", "fp4"):
        m = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=dtype, compress_statistics=cfg.double_quant,
                              quant_type=cfg.method, device="meta")
        qs = quant_state(tensors, cfg.method, cfg.group_size, (n, k), dtype)
        m.weight = bnb.nn.Params4bit(tensors["qweight"].reshape(-1, 1), requires_grad=False, quant_state=qs,
                                     blocksize=cfg.group_size, compress_statistics=cfg.double_quant,
                                     quant_type=cfg.method, bnb_quantized=True, module=m)
    else:  # int8 via bitsandbytes: row-wise absmax int8, plus fp16 outliers for llm.int8
        threshold = cfg.llm_int8_threshold if cfg.method == "llm.int8" else 0.0
        m = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, threshold=threshold,
                                device="meta")
        m.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    if bias is not None:
        m.bias = torch.nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
    return m


def dequantize_bnb(m) -> torch.Tensor:
    """fp32 [out, in] weight of a bitsandbytes Linear4bit / Linear8bitLt."""
    bnb = _bnb()
    if isinstance(m, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    cb, scb = m.weight.CB if m.weight.CB is not None else m.weight.data, m.weight.SCB
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def from_bnb_module(m, backend: str = "auto"):
    """effnb QuantLinear holding exactly a bitsandbytes layer's weights (nf4/fp4, or int8 per channel)."""
    bnb = _bnb()
    from .linear import QuantLinear

    bias = m.bias.detach() if m.bias is not None else None
    if isinstance(m, bnb.nn.Linear4bit):
        qs = m.weight.quant_state
        n, k = qs.shape
        t = {"qweight": m.weight.data.reshape(-1).view(torch.uint8)}
        if qs.nested:
            t.update(qabsmax=qs.absmax, absmax2=qs.state2.absmax, code2=qs.state2.code,
                     offset=torch.as_tensor(qs.offset, dtype=torch.float32).reshape(1))
        else:
            t["absmax"] = qs.absmax.float()
        return QuantLinear(k, n, qs.quant_type, qs.blocksize, t, bias, backend=backend, method=qs.quant_type)
    if getattr(m, "state", None) is not None and m.state.threshold > 0:
        raise ValueError("an llm.int8 layer (outlier threshold > 0) has no exact effnb equivalent; keep it in bitsandbytes")
    cb = m.weight.CB if m.weight.CB is not None else m.weight.data
    scales = (m.weight.SCB.float() / 127.0).unsqueeze(1)  # fp32 keeps it exact (runs the reference path)
    n, k = cb.shape
    return QuantLinear(k, n, "int8", k, {"qweight": cb, "scales": scales}, bias, backend=backend, method="int8")
