"""The environment a measurement was taken in: device, processor, threads, versions, date."""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict:
    """JSON-ready description of where a measurement ran."""
    import torch

    env = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {p: _version(p) for p in ("effnb", "torch", "transformers", "peft", "bitsandbytes", "triton")},
    }
    return env
