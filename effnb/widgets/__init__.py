"""Interactive views of effnb's techniques: live in JupyterLab, static (HTML + plotly) everywhere else.

    from effnb.widgets import QuantExplorer, LoraExplorer, RouterExplorer, CompareDashboard, TrainingMonitor

Light to import: ipywidgets, plotly and torch load when a widget is made. See docs/widgets.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "QuantExplorer": ".quant", "LoraExplorer": ".lora", "RouterExplorer": ".router",
    "CompareDashboard": ".compare", "TrainingMonitor": ".training", "explore": ".api",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'effnb.widgets' has no attribute {name!r}")
