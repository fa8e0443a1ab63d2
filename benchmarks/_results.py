"""What every benchmark's ``--json`` records besides its figures: device, date, command, versions, load.

The fields are those ``benchmarks/render.py`` reads (schema ``effnb.bench-result/1``), so a run written
with ``--json benchmarks/results/NAME.json`` renders into docs/benchmarks.md as it is. Standard library
only; library versions are read from the installed distributions, without importing them.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

SCHEMA = "effnb.bench-result/1"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "triton")


def device() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {n} CPUs available, {platform.system()} {platform.machine()}"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import effnb  # torch-free import

        tree = Path(effnb.__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["effnb"] = (sha + ("+changes" if dirty else "")) if sha else str(tree)
    except Exception:  # noqa: BLE001 - a version line is never worth failing a benchmark for
        pass
    return out


def envelope(section: str, title: str, fmt: str, *, order: int = 1, method: str | None = None) -> dict:
    """The fields of a results file, to be completed by ``finish`` once the run is over."""
    doc = {"schema": SCHEMA, "section": section, "order": order, "title": title, "status": "measured",
           "format": fmt, "device": device(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
           "versions": versions(), "load_average_start": os.getloadavg()[0]}
    if method:
        doc["method"] = method
    return doc


def finish(doc: dict) -> dict:
    end = os.getloadavg()[0]
    doc["load_average_end"] = end
    doc["load_average"] = f"{doc['load_average_start']:.1f} at start, {end:.1f} at end"
    return doc
