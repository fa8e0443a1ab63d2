"""LoRA, QLoRA, LoRA+ and DoRA on Hugging Face PEFT, a training loop with a live view, safe merging.

    res = effnb.lora(model, rank=8, targets="attn")        # a PEFT model (a copy)
    res = effnb.finetune(res.model, data="python-api")     # trained copy; res.details["history"]
    merged = effnb.merge(res.model).model                  # plain model, adapters folded in
    effnb.adapters.save_adapter(res.model, "adapter/")         # safetensors
    lmodel = effnb.adapters.load_adapter(model, "adapter/")

Light to import: torch and PEFT load on first use, so the command registry can read the configs.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import FinetuneConfig, LoraConfig, MergeConfig

_LAZY = {
    "lora": ".api", "finetune": ".api", "merge": ".api", "save_adapter": ".adapter_io", "load_adapter": ".adapter_io",
    "qa_pairs": ".task", "build_task": ".task", "QuantLoraLinear": ".qlora", "resolve_targets": ".targets",
    "TrainingMonitor": ".monitor",
}

__all__ = ["FinetuneConfig", "LoraConfig", "MergeConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "resolve_targets":
        return importlib.import_module(".targets", __name__).resolve
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'effnb.adapters' has no attribute {name!r}")
