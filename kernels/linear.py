"""``QuantLinear``: a Linear layer whose weight is stored in one of effnb's quantized formats.

The module only stores tensors; what each format holds and how it dequantizes is the Format
table's (``formats.py``). ``forward`` goes through ``ops.linear``, which picks the path (the one
``ops.supports`` decides) and counts it, so a report can name the path that produced its numbers.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .formats import FORMATS, get_format

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_layer(in_features, out_features, fmt, group_size, tensors: dict, bias=None, where: str = "",
                prefix: str = "") -> None:
    """Raise ValueError unless the sizes and buffers describe a layer the kernels can read safely.

    Every buffer's dtype and shape is checked against (in_features, out_features, group_size), so
    no kernel can read past a buffer; ``where`` starts the message (a file, a layer), ``prefix``
    the tensor names (the layer's name in a state dict).
    """
    at = f"{where}: " if where else ""
    form = FORMATS.get(fmt) if isinstance(fmt, str) else None
    if form is None:
        raise ValueError(f"{at}unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{at}{name} must be a positive integer, got {v!r}")
    k, n, g = in_features, out_features, group_size
    why = form.layout_error(k, g)
    if why is not None:
        raise ValueError(at + why)
    present = {name for name, t in tensors.items() if t is not None and not name.startswith("_")}  # "_sq_err": not a buffer
    try:
        required = form.required(present)
    except ValueError as exc:
        raise ValueError(f"{at}{exc}") from None
    missing, unknown = required - present, present - set(form.buffers)
    if missing or unknown:
        raise ValueError(f"{at}{fmt} layer needs tensors {sorted(required)}; missing {sorted(missing)}, "
                         f"not allowed {sorted(unknown)}")
    sizes = f"(in_features {k}, out_features {n}, group_size {g})"
    for name, (dtypes, shape) in form.expected(n, k, g).items():
        t = tensors.get(name)
        if t is not None:
            _check_tensor(t, prefix + name, dtypes, shape, at, sizes)
    if bias is not None:
        _check_tensor(bias, prefix + "bias", _FLOAT_DTYPES, (n,), at, sizes)


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
    """y = x @ dequantize(W).T + bias, with W kept in ``fmt`` (see ``reference.py`` for the layouts).

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
        self._fast = None  # (qweight data_ptr, max input numel, prepared callable) from ops.linear
        self.backend = backend
        for name in get_format(fmt).buffers:
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
        stored = {n: self._buffers.pop(n) for n in self.format.buffers if self._buffers.get(n) is not None}
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
    def format(self):
        """This layer's entry of the Format table."""
        return get_format(self.fmt)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The stored buffers by name (None for an optional one the layer does not hold)."""
        return {n: getattr(self, n, None) for n in self.format.buffers}

    @property
    def double_quant(self) -> bool:
        return getattr(self, "qabsmax", None) is not None

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax of nf4/fp4 as fp32 (undoing double quantization if used)."""
        return self.format.absmax(self.tensors())

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 [out_features, in_features] (the reference every path must match)."""
        return self.format.dequantize(self.tensors(), self.group_size, (self.out_features, self.in_features))

    def check(self) -> None:
        """Raise ValueError unless the current buffers still match the layer's sizes (the kernels'
        bounds: checked before any pointer goes to compiled code)."""
        check_layer(self.in_features, self.out_features, self.fmt, self.group_size, self.tensors(), self.bias)

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

    def count_call(self, path: str) -> None:
        """Record that ``path`` served a call (``ops.linear`` does, for the report)."""
        self._calls[path] += 1

    def keep_fast_call(self, run, max_numel: int) -> None:
        """Keep ``run`` (a bound call into the C kernel) for later inputs of at most ``max_numel``
        elements; valid while ``qweight`` is the same tensor and the backend setting unchanged."""
        self._fast = (self._buffers["qweight"].data_ptr(), max_numel, run)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls a layer hundreds of times per token: once ``ops.linear`` has picked the CPU
        # kernel, later calls it would pick again go straight to the bound call of the same
        # registered CPU implementation (the dispatcher costs tens of us a call). Each check here
        # is a cheap attribute read: at 210 calls a token, every microsecond is 0.2 ms.
        fast = self._fast
        if (fast is not None and x.is_cpu and x.numel() <= fast[1]
                and not (x.requires_grad and torch.is_grad_enabled())
                and fast[0] == self._buffers["qweight"].data_ptr()):
            self._fast_count[0] += 1
            return fast[2](x)
        from .ops import linear

        return linear(self, x)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"method={self.method}, group_size={self.group_size}{dq}, backend={self.backend}")

    # ------------------------------------------------------------------------------- save/load

    def config_dict(self) -> dict:
        """JSON-able description: enough, with the state dict, to rebuild this module."""
        return {"in_features": self.in_features, "out_features": self.out_features, "fmt": self.fmt,
                "group_size": self.group_size, "method": self.method, "bias": self.bias is not None,
                "buffers": [n for n in self.format.buffers if getattr(self, n) is not None]}

    @classmethod
    def empty_like_config(cls, cfg: dict, state: dict[str, torch.Tensor], prefix: str, backend: str = "auto"):
        tensors = {n: state[prefix + n] for n in cfg["buffers"]}
        bias = state.get(prefix + "bias") if cfg["bias"] else None
        return cls(cfg["in_features"], cfg["out_features"], cfg["fmt"], cfg["group_size"], tensors, bias,
                   backend=backend, method=cfg.get("method"))
