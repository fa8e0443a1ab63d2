"""effnb: model efficiency you do and see in one notebook line.

The public API is imported lazily: ``import effnb`` and ``%load_ext effnb`` load
neither torch nor transformers; the first call that needs them does.

    import effnb
    model = effnb.load_model("smollm2-135m")
    report = effnb.audit(model)
    res = effnb.quantize(model, method="nf4", group_size=64)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute"; one table, so the API and the docs cannot drift.
_LAZY: dict[str, str] = {
    "load_model": "effnb.models:load_model",
    "tokenizer_for": "effnb.models:tokenizer_for",
    "attach_tokenizer": "effnb.models:attach_tokenizer",
    "find_tokenizer": "effnb.models:find_tokenizer",
    "attach_example_inputs": "effnb.models:attach_example_inputs",
    "copy_model": "effnb.models:copy_model",
    "state_hash": "effnb.models:state_hash",
    "EMBEDDED_MODELS": "effnb.models:EMBEDDED_MODELS",
    "audit": "effnb.measure:audit",
    "compare": "effnb.measure:compare",
    "measure_model": "effnb.measure:measure_model",
    "AuditConfig": "effnb.measure:AuditConfig",
    "Report": "effnb.report:Report",
    "Result": "effnb.report:Result",
    "quantize": "effnb.quant.api:quantize",
    "save": "effnb.quant.serialize:save",
    "load": "effnb.quant.serialize:load",
    "lora": "effnb.adapters.api:lora",
    "finetune": "effnb.adapters.api:finetune",
    "merge": "effnb.adapters.api:merge",
    "moe": "effnb.experts.api:moe",
    "moe_stats": "effnb.experts.api:moe_stats",
    "export": "effnb.exporters.api:export",
}

# The technique packages are named apart from their functions (``effnb.adapters`` holds ``effnb.lora``,
# ``effnb.experts`` holds ``effnb.moe``, ``effnb.exporters`` holds ``effnb.export``), so importing a
# subpackage never rebinds a public function's name.
_SUBMODULES = {"data", "measure", "models", "report", "commands", "magics", "cli", "quant", "adapters", "experts",
               "exporters", "exercises", "widgets", "kernels", "technique", "options", "torch_utils"}

__all__ = sorted([*_LAZY, "data", "load_ipython_extension", "__version__"])

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .measure import AuditConfig, audit, compare, measure_model  # noqa: F401
    from .models import attach_tokenizer, copy_model, load_model, state_hash, tokenizer_for  # noqa: F401
    from .report import Report, Result  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name].split(":")
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value  # cache: the next access is a plain attribute
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"effnb.{name}")
    raise AttributeError(f"module 'effnb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext effnb``: register ``%efficient`` and ``%%efficient`` (no torch import)."""
    from .magics import EfficientMagics

    ipython.register_magics(EfficientMagics)


def unload_ipython_extension(ipython: Any) -> None:  # noqa: ARG001 - IPython's signature
    """Nothing to undo: magics are replaced when the extension is loaded again."""
