"""``TrainingMonitor``: the live view of a training loop; defined by the fine-tuning technique
(``effnb.adapters.monitor``) and offered here with the other widgets."""

from __future__ import annotations

from ..adapters.monitor import TrainingMonitor

__all__ = ["TrainingMonitor"]
