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
_DQ_STATS = ("qabsmax", "absmax2", "code2", "offset")  # nf4/fp4 double quantization: all four or none


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expected(fmt: str, n: int, k: int, g: int) -> dict[str, tuple[tuple[torch.dtype, ...], object]]:
    """Per buffer: (allowed dtypes, shape tuple or element count) that the kernels rely on."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if fmt in ("int4", "int8", "fp8"):
        q = {"int4": (torch.uint8,), "int8": (torch.int8,), "fp8": (torch.float8_e4m3fn,)}[fmt]
        return {"qweight": (q, (n, k // 2 if fmt == "int4" else k)), "scales": (floats, (n, k // g)),
                "zeros": (floats, (n, k // g))}
    blocks = -(-n * k // g)
    f32 = (torch.float32,)  # the CPU kernels read these as fp32 arrays
    return {"qweight": ((torch.uint8,), -(-n * k // 2)), "absmax": (f32, blocks), "qabsmax": ((torch.uint8,), blocks),
            "absmax2": (f32, -(-blocks // F.DQ_BLOCKSIZE)), "code2": (f32, 256), "offset": (f32, 1)}


def check_layer(in_features, out_features, fmt, group_size, tensors: dict, bias=None, where: str = "",
                prefix: str = "") -> None:
    """Raise ValueError unless the sizes and buffers describe a layer the kernels can read safely.

    Every buffer's dtype and shape is checked against (in_features, out_features, group_size), so
    no kernel can read past a buffer; ``where`` starts the message (a file, a layer), ``prefix``
    the tensor names (the layer's name in a state dict).
    """
    at = f"{where}: " if where else ""
    if fmt not in FORMATS:
        raise ValueError(f"{at}unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{at}{name} must be a positive integer, got {v!r}")
    k, n, g = in_features, out_features, group_size
    if fmt in ("int4", "int8", "fp8") and k % g:
        raise ValueError(f"{at}group_size {g} does not divide in_features {k} ({fmt} groups run along a row)")
    if fmt == "int4" and k % 2:
        raise ValueError(f"{at}int4 packs two columns per byte: in_features {k} must be even")
    present = {name for name, t in tensors.items() if t is not None and not name.startswith("_")}  # "_sq_err": not a buffer
    required = {"qweight", "scales"} if fmt in ("int4", "int8", "fp8") else {"qweight"}
    if fmt in ("nf4", "fp4"):
        dq = present & set(_DQ_STATS)
        if dq and dq != set(_DQ_STATS):
            raise ValueError(f"{at}double quantization needs all of {', '.join(_DQ_STATS)}; missing "
                             f"{', '.join(sorted(set(_DQ_STATS) - dq))}")
        required |= set(_DQ_STATS) if dq else {"absmax"}
    missing, unknown = required - present, present - set(_BUFFERS[fmt])
    if missing or unknown:
        raise ValueError(f"{at}{fmt} layer needs tensors {sorted(required)}; missing {sorted(missing)}, "
                         f"not allowed {sorted(unknown)}")
    sizes = f"(in_features {k}, out_features {n}, group_size {g})"
    for name, (dtypes, shape) in _expected(fmt, n, k, g).items():
        t = tensors.get(name)
        if t is not None:
            _check_tensor(t, prefix + name, dtypes, shape, at, sizes)
    if bias is not None:
        _check_tensor(bias, prefix + "bias", (torch.float16, torch.bfloat16, torch.float32, torch.float64), (n,), at, sizes)


def _check_tensor(t, name: str, dtypes, shape, at: str, sizes: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{at}{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{at}{name} has dtype {str(t.dtype).replace('torch.', '')}; expected "
                         f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)}")
    ok = tuple(t.shape) == shape if isinstance(shape, tuple) else t.numel() == shape
    if not ok:
        want = list(shape) if isinstance(shape, tuple) else f"{shape} elements"
        raise ValueError(f"{at}{name} has shape {list(t.shape)}; the layer's sizes {sizes} need {want}")


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + bias, with W kept in ``fmt`` (see ``formats.py`` for the layouts).

    ``group_size`` is the group along K (int4/int8/fp8) or bitsandbytes' ``blocksize`` (nf4/fp4).
    ``backend`` is "auto" (fastest supported), "reference", "cpu" or "cuda".
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int,
                 tensors: dict[str, torch.Tensor | None], bias: torch.Tensor | None = None,
                 backend: str = "auto", method: str | None = None):
        super().__init__()
        check_layer(in_features, out_features, fmt, group_size, tensors, bias)
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

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)`` / ``.half()`` / ``.to(device)`` on a quantized model: the stored tensors
        (codes, scales, zeros, statistics) keep their dtypes and only move device. Cast with the rest,
        the fp32 statistics of nf4/fp4 would break the CPU kernels' contract and fp16 scales would be
        rounded to bf16; the bias follows the model's dtype as any parameter does."""
        stored = {n: self._buffers.pop(n) for n in _BUFFERS[self.fmt] if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in stored.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        self._fast = None  # pointers into the old tensors must not be reused
        return self

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

    def check(self) -> None:
        """Raise ValueError unless the current buffers still match the layer's sizes (the kernels'
        bounds: checked before any pointer goes to compiled code)."""
        tensors = {n: getattr(self, n, None) for n in _BUFFERS[self.fmt]}
        check_layer(self.in_features, self.out_features, self.fmt, self.group_size, tensors, self.bias)

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
