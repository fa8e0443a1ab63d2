"""Random quantized weights and tolerances shared by the kernel tests, notebook 05 and benchmarks."""

from __future__ import annotations

import torch

from .formats import DQ_STATS, get_format

# Largest allowed max|y - ref| / max|ref| per activation dtype: the kernels round dequantized
# weights to the activation dtype before the dot (as bitsandbytes and cuBLAS paths do) and
# accumulate in fp32; fp32 activations use IEEE fp32 dots.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(fmt: str, n: int, k: int, group: int, *, symmetric: bool = False, double_quant: bool = False,
              seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Quantize a fresh random W [n, k]: the keyword arguments of ``interface.run_kernel`` (plus fmt/n/k/group)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))  # rows of varied scale
    form = get_format(fmt)
    if not form.ops:
        raise ValueError(f"unknown format {fmt!r}; expected one of int4, int8, nf4, fp4")
    d = form.quantize(w, group, symmetric=symmetric, double_quant=double_quant)
    if d.get("zeros") is not None:  # zeros off the integer grid too, as HQQ/GPTQ produce
        d["zeros"] = (d["zeros"].float() + 0.3 * torch.rand(d["zeros"].shape, generator=gen)).half()
    case: dict = {"fmt": fmt, "n": n, "k": k, "group": group}
    case.update((name, d[name]) for name in ("qweight", "scales", "zeros", "absmax") if name in d)
    if "qabsmax" in d:
        case["dq"] = tuple(d[name] for name in DQ_STATS)
    return {key: (v.to(device) if isinstance(v, torch.Tensor) else
                  tuple(t.to(device) for t in v) if isinstance(v, tuple) else v) for key, v in case.items()}


def weight_args(case: dict) -> dict:
    """The tensors and sizes of ``case`` as keyword arguments of run_kernel/reference_linear."""
    return {key: v for key, v in case.items() if key != "fmt"}


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| in float64; NaN anywhere in y gives inf (an unwritten, poisoned output)."""
    if torch.isnan(y).any():
        return float("inf")
    y64, r64 = y.double(), ref.double()
    return float((y64 - r64).abs().max() / r64.abs().max().clamp(min=1e-30))
