"""Adapters on disk: ``save_adapter`` writes PEFT's safetensors + adapter_config.json, ``load_adapter``
attaches a saved one to a copy of a model (effnb-quantized bases included)."""

from __future__ import annotations

import sys
from pathlib import Path

from .state import base_of, is_peft, set_lora_meta


def save_adapter(model, path, adapter_name: str | None = None) -> str:
    """Write the adapter (safetensors + adapter_config.json) to directory ``path``; returns the path."""
    from .report import active_adapter

    if not is_peft(model):
        raise ValueError(f"save_adapter: this {type(model).__name__} has no adapters; use effnb.lora first")
    name = adapter_name or active_adapter(model)
    if name not in model.peft_config:
        raise ValueError(f"save_adapter: no adapter named {name!r}; adapters: {', '.join(model.peft_config)}")
    out = Path(path).expanduser()
    if sys.modules.get("bitsandbytes") is not None:  # PEFT reads state_dict(): bitsandbytes' CPU layout must not leak into it
        from ..kernels.bnb import guard_layout

        guard_layout(model)
    model.save_pretrained(str(out), selected_adapters=[name], safe_serialization=True)
    # PEFT writes non-default adapters under a sub-directory of their name
    return str(out / name) if name != "default" else str(out)


def load_adapter(model, path, adapter_name: str = "default", *, trainable: bool = False, inplace: bool = False):
    """A copy of ``model`` with the adapter saved at ``path`` attached (frozen unless ``trainable``)."""
    import peft

    from ..models import check_model, copy_model
    from ..torch_utils import is_quantized_linear
    from .report import quantized_layers

    check_model(model)
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").exists():
        raise ValueError(f"load_adapter: {str(p)!r} holds no adapter_config.json (save one with save_adapter)")
    if is_peft(model) and adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pass adapter_name='other'")
    config = peft.LoraConfig.from_pretrained(str(p))
    config.inference_mode = not trainable
    if any(is_quantized_linear(m) for m in model.modules()):
        from .qlora import register

        register(config)
    work = model if inplace else copy_model(model)
    if is_peft(work):
        work.load_adapter(str(p), adapter_name=adapter_name, is_trainable=trainable)
        work.set_adapter(adapter_name)
        out = work
    else:
        out = peft.PeftModel.from_pretrained(work, str(p), adapter_name=adapter_name, config=config,
                                             is_trainable=trainable)
    set_lora_meta(out, {"adapter_name": adapter_name, "loaded_from": str(p),
                        "quantized_base": bool(quantized_layers(base_of(out)))})
    return out
