"""Measurements: memory, speed, quality, FLOPs, energy and the environment, gathered into report rows.

Light to import: the heavy parts load on first use, so the command registry can read
``AuditConfig`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import AuditConfig

_LAZY = {
    "measure_model": ".core", "audit": ".core", "compare": ".core", "measure_region": ".core",
    "perplexity": ".quality", "snr_db": "..torch_utils", "embed": ".quality", "retrieval_recall": ".quality",
    "embedding_agreement": ".quality", "environment": ".env", "PeakMemory": ".memory",
    "count_parameters": ".memory", "weight_bytes": ".memory", "flops_per_token": ".flops",
    "EnergyMeter": ".energy", "read_bandwidth": ".bandwidth", "bytes_per_token": ".bandwidth",
}

__all__ = ["AuditConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'effnb.measure' has no attribute {name!r}")
