"""Kernel tests: make ``effnb.kernels`` importable from a checkout whose editable install predates it.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so one process runs the
kernels either interpreted (CPU tensors) or compiled (CUDA). Without CUDA (CI), this file turns
the interpreter on before anything imports triton; on a GPU machine it leaves Triton compiled so
the GPU tests run, and the interpreter tests skip with a reason unless ``TRITON_INTERPRET=1`` was
set for the run (``make`` lines in .gl/progress-kernels.md run both).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys


def _ensure_kernels_package() -> None:
    import effnb

    if importlib.util.find_spec("effnb.kernels") is not None:
        return
    root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location("effnb.kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["effnb.kernels"] = module
    spec.loader.exec_module(module)
    effnb.kernels = module


_ensure_kernels_package()


def _maybe_interpret() -> None:
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET") or "triton" in sys.modules or torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"


_maybe_interpret()
