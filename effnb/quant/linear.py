"""``QuantLinear``: a Linear layer whose weight is stored in one of effnb's quantized formats.

The module only stores tensors and says how to dequantize them; ``forward`` goes through the
backend registry (``backends.py``: first match wins, ending in the pure-PyTorch reference) and
counts which backend ran, so a report can name the path that produced its numbers.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from . import formats as F

FORMATS = ("int4", "int8", "nf4", "fp4", "fp8")

# buffers each format stores (optional ones may be absent)
_BUFFERS = {
    "int4": ("qweight", "scales", "zeros"),
    "int8": ("qweight", "scales"),
    "fp8": ("qweight", "scales"),
    "nf4": ("qweight", "absmax", "qabsmax", "absmax2", "code2", "offset"),
    "fp4": ("qweight", "absmax", "qabsmax", "absmax2", "code2", "offset"),
}


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + bias, with W kept in ``fmt`` (see ``formats.py`` for the layouts).

    ``group_size`` is the group along K (int4/int8/fp8) or bitsandbytes' ``blocksize`` (nf4/fp4).
    ``backend`` is "auto" (fastest supported), "reference", "cpu" or "cuda".
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int,
                 tensors: dict[str, torch.Tensor | None], bias: torch.Tensor | None = None,
                 backend: str = "auto", method: str | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.method = fmt, group_size, method or fmt
        self._fast = None  # (qweight data_ptr, max input numel, prepared callable) from backends._cpu_run
        self.backend = backend
        for name in _BUFFERS[fmt]:
            t = tensors.get(name)
            self.register_buffer(name, t.contiguous() if t is not None else None)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._calls: Counter = Counter()
        self._fast_count = [0]  # a list, so counting skips nn.Module.__setattr__ (~2 us a call)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value
        self._fast = None  # the next call dispatches again under the new setting

    # ---------------------------------------------------------------------------------- weights

    @property
    def double_quant(self) -> bool:
        return getattr(self, "qabsmax", None) is not None

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax of nf4/fp4 as fp32 (undoing double quantization if used)."""
        if self.double_quant:
            return F.undo_double_quant(self.qabsmax, self.absmax2, self.code2, self.offset)
        return self.absmax

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 [out_features, in_features] (the reference every backend must match)."""
        shape = (self.out_features, self.in_features)
        if self.fmt == "int4":
            return F.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)
        if self.fmt == "int8":
            return F.dequantize_int8(self.qweight, self.scales, self.group_size)
        if self.fmt == "fp8":
            return F.dequantize_fp8(self.qweight, self.scales, self.group_size)
        return F.dequantize_4bit(self.qweight, self.absmax_fp32(), self.group_size, self.fmt, shape)

    def effnb_logical_numel(self) -> int:
        """Logical weight count (the packed buffers are not parameters); read by effnb.measure."""
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight with its scales/zeros/statistics (bias excluded)."""
        return sum(b.nbytes for b in self.buffers(recurse=False) if b is not None)

    # ---------------------------------------------------------------------------------- forward

    @property
    def backend_calls(self) -> Counter:
        """How many calls each backend served since quantization (or ``reset_backend_calls``)."""
        calls = Counter(self._calls)
        if self._fast_count[0]:
            calls["cpu-fast"] += self._fast_count[0]
        return calls

    def reset_backend_calls(self) -> None:
        self._calls.clear()
        self._fast_count[0] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls a layer hundreds of times per token: once the registry has picked the CPU
        # kernel, later calls that it would pick again skip the dispatch (about 40 us a call). Each
        # check here is a cheap attribute read: at 210 calls a token, every microsecond is 0.2 ms.
        fast = self._fast
        if (fast is not None and x.is_cpu and x.numel() <= fast[1]
                and not (x.requires_grad and torch.is_grad_enabled())
                and fast[0] == self._buffers["qweight"].data_ptr()):
            self._fast_count[0] += 1
            return fast[2](x)
        from .backends import dispatch

        return dispatch(self, x)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"method={self.method}, group_size={self.group_size}{dq}, backend={self.backend}")

    # ------------------------------------------------------------------------------- save/load

    def config_dict(self) -> dict:
        """JSON-able description: enough, with the state dict, to rebuild this module."""
        return {"in_features": self.in_features, "out_features": self.out_features, "fmt": self.fmt,
                "group_size": self.group_size, "method": self.method, "bias": self.bias is not None,
                "buffers": [n for n in _BUFFERS[self.fmt] if getattr(self, n) is not None]}

    @classmethod
    def empty_like_config(cls, cfg: dict, state: dict[str, torch.Tensor], prefix: str, backend: str = "auto"):
        tensors = {n: state[prefix + n] for n in cfg["buffers"]}
        bias = state.get(prefix + "bias") if cfg["bias"] else None
        return cls(cfg["in_features"], cfg["out_features"], cfg["fmt"], cfg["group_size"], tensors, bias,
                   backend=backend, method=cfg.get("method"))
