"""What effnb knows about a model carrying adapters: is it a PEFT model, and what ``effnb.lora`` did to it.

``effnb.lora`` records its choices (rank, targets, LoRA+ ratio, ...) on the PEFT model under
``META``, so that ``finetune`` can pick up the LoRA+ ratio and name the variant, and ``merge``
can carry the record over to the merged model.
"""

from __future__ import annotations

META = "_effnb_lora"  # the attribute name: models saved by earlier versions carry it too


def is_peft(model) -> bool:
    """True for a PEFT model (one that holds adapters and its base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_of(model):
    """The model under the adapters (the model itself when it has none)."""
    return model.get_base_model() if is_peft(model) else model


def lora_meta(model) -> dict:
    """A copy of what ``effnb.lora`` recorded on ``model`` ({} when nothing)."""
    return dict(getattr(model, META, None) or {})


def set_lora_meta(model, meta: dict) -> None:
    object.__setattr__(model, META, meta)  # a plain attribute of the outer model, not a module or parameter
