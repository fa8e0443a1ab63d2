"""QLoRA on effnb's own quantized layers: a PEFT LoRA layer around ``QuantLinear`` (``effnb.kernels.linear``).

bitsandbytes layers need one thing from us (PEFT ships their LoRA layers): on a CPU with AVX512-BF16,
bitsandbytes repacks a ``Linear4bit`` on its first eval no-grad forward, and from then on every forward,
training ones too, runs its bf16 ``gemv_4bit`` kernel, for which bitsandbytes registers no autograd
formula: ``bnb_layers_for_training`` puts them back in the canonical layout (the differentiable
``MatMul4Bit`` path) before training steps. For ``QuantLinear`` we register ``QuantLoraLinear`` with
PEFT's custom-module mechanism (``LoraConfig._register_custom_module``).

The base matmul goes through ``_DequantMatmul``: forward dequantizes the weight, multiplies, and
drops it; backward dequantizes it again to pass the gradient to the input. Autograd therefore keeps
no full-precision copy of any weight between forward and backward: memory stays that of the 4-bit
weights plus one layer's dequantized weight at a time (the point of QLoRA). A plain
``F.linear(x, layer.dequantize())`` would save every dequantized weight for backward and use as
much memory as the float model.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T + b with W = layer.dequantize(); saves nothing but the layer (4-bit) for backward."""

    @staticmethod
    def forward(ctx, x, layer):  # x: [..., K] -> y: [..., N]
        ctx.layer = layer
        with torch.no_grad():
            return type(layer).forward(layer, x)  # the layer's own backend registry

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: [..., N] -> grad_x: [..., K]; the weight is frozen
        from ..kernels.ops import dequantize_fast

        w = dequantize_fast(ctx.layer).to(device=grad_y.device, dtype=grad_y.dtype)  # [N, K]
        return grad_y @ w, None


def quant_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """The frozen quantized layer applied to ``x``, differentiable with respect to ``x``."""
    if x.requires_grad and torch.is_grad_enabled():
        return _DequantMatmul.apply(x, layer)
    return type(layer).forward(layer, x)


def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
    return quant_matmul(self, x)


def keep_frozen_layers_lean(model) -> int:
    """Route the quantized layers that carry no adapter through ``quant_matmul`` too.

    Otherwise their forward (dequantize, then F.linear) would make autograd keep each dequantized
    fp32 weight until backward whenever the input needs a gradient: as much memory as the float
    model. Set per instance on the model being adapted (never on the class); the state dict is
    unchanged. Returns the number of layers routed.
    """
    from ..kernels.linear import QuantLinear

    n = 0
    for m in model.modules():
        if type(m) is QuantLinear and "forward" not in m.__dict__:
            m.forward = _frozen_forward.__get__(m)
            n += 1
    return n


class QuantLoraLinear(torch.nn.Module, LoraLayer):
    """LoRA adapters on an effnb ``QuantLinear`` base: y = Q(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        if config.use_dora:
            raise ValueError("DoRA on an effnb-quantized base is not supported; use dora=False, "
                             "or quantize with backend='bitsandbytes' (PEFT supports DoRA there)")
        if config.lora_bias:
            raise ValueError("lora_bias is not supported on an effnb-quantized base")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A as [out_features, in_features] fp32."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Dequantize, add the adapters, quantize again in the same format (see ``requantize``)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        w = base.dequantize().float()
        for name in adapter_names:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).to(w.device)
                self.merged_adapters.append(name)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"non-finite values in the merged weights of adapters {adapter_names}")
        self.base_layer = requantize(base, w)

    def unmerge(self) -> None:
        raise ValueError("cannot unmerge from a re-quantized base: the rounding is not reversible; "
                         "keep the unmerged model (effnb.merge returns a new one)")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        result = quant_matmul(base, x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa = x.to(a.weight.dtype)
            result = result + (b(a(self.lora_dropout[name](xa))) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def requantize(layer, w: torch.Tensor):
    """A new ``QuantLinear`` in ``layer``'s format and group size holding ``w`` ([out, in]).

    Round-to-nearest in the layer's own format (its ``Format.quantize``): exact re-use of the format
    that ``effnb.quantize`` stored (nf4/fp4 blocks with or without double quantization, int4 with or
    without zero points, int8/fp8 groups). Layers made by hqq or gptq are re-quantized by
    round-to-nearest in the same format; the report says so.
    """
    from ..kernels.formats import get_format

    form = get_format(layer.fmt)
    opts = {}
    if "zeros" in form.buffers:  # a format with optional zero points: keep the layer's choice
        opts["symmetric"] = getattr(layer, "zeros", None) is None
    if "qabsmax" in form.buffers:  # a format whose block absmax may be double-quantized: likewise
        opts["double_quant"] = layer.double_quant
    tensors = form.quantize(w.float().contiguous(), layer.group_size, **opts)
    bias = layer.bias.detach() if layer.bias is not None else None
    return type(layer)(layer.in_features, layer.out_features, layer.fmt, layer.group_size, tensors, bias,
                       backend=layer.backend, method=layer.method)


def bnb_layers_for_training(model) -> int:
    """Put bitsandbytes 4-bit layers that its AVX512-BF16 CPU path repacked (on an eval forward) back
    into the canonical layout, so training forwards take bitsandbytes' differentiable path; returns how
    many layers changed. Imports nothing when bitsandbytes is not loaded (then there are none)."""
    import sys

    if sys.modules.get("bitsandbytes") is None:  # not loaded, or blocked (sys.modules entry None)
        return 0
    from ..kernels.bnb import restore_layout

    return restore_layout(model)


def register(lora_config) -> None:
    """Tell PEFT to wrap effnb's ``QuantLinear`` layers with ``QuantLoraLinear``."""
    from ..kernels.linear import QuantLinear

    lora_config._register_custom_module({QuantLinear: QuantLoraLinear})
