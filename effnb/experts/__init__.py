"""Mixture-of-Experts: split dense FFNs into experts (MoEfication), upcycle, routing statistics, the MoE block.

Light to import (no torch): the command registry reads the configs from here. The heavy parts
load on first use:

    res = effnb.moe(model, experts=8, top_k=2, method="split")   # Result
    stats = effnb.moe_stats(res.model)                             # MoEStats, with a heatmap
    loss = loss + effnb.experts.aux_loss(model)                        # load-balancing loss while training
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import MoEConfig, MoEStatsConfig

_LAZY = {
    "moe": ".api", "moe_stats": ".api", "set_top_k": ".sweep",
    "MoEFFN": ".block", "aux_loss": ".block", "moe_blocks": ".block", "moe_ffn": ".block",
    "moe_ffn_reference": ".block", "switch_aux_loss": ".block", "set_grouped_backend": ".block",
    "QuantMoEFFN": ".quant",
    "find_ffns": ".ffn", "MoEStats": ".stats", "routing_stats": ".stats",
    "balanced_kmeans": ".split",
}

__all__ = ["MoEConfig", "MoEStatsConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'effnb.experts' has no attribute {name!r}")
