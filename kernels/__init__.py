"""effnb.kernels: the runtime under every quantized layer (the top-level ``kernels/`` folder).

    formats.py     the Format table: buffers, dtypes, shapes and rules of each storage format
    reference.py   the PyTorch references: pack, quantize, dequantize, linear (the ground truth)
    linear.py      ``QuantLinear`` and ``check_layer``
    ops.py         the ``torch.library`` ops (``effnb::int4_linear`` ...) and ``supports``, the one
                   place that decides which implementation runs (and names the path for reports)
    functions.py   public functions over the ops (``int4_linear``, ``nf4_linear`` ...)
    cpu/           the C++ kernels (``qlinear.cpp``), their guarded build and loader, bound calls
    triton/        the Triton kernels (quantized matmul, MoE grouped matmul) and their planning
    bnb.py         bitsandbytes' stored layouts

Importing this package imports neither torch nor triton: the submodules load on use. It never
imports the techniques (``effnb.quant`` ...): they build on it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["formats", "functions", "ops", "reference", "triton_available", "use_interpreter"]


def triton_available() -> bool:
    """True when the ``triton`` package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_interpreter() -> bool:
    """Run the Triton kernels under Triton's interpreter (on CPU tensors) in this process.

    Sets ``TRITON_INTERPRET=1``, which Triton reads when it is first imported. Returns True when
    the interpreter is (or will be) active; raises RuntimeError when triton was already imported
    in compiled mode, since it cannot be switched afterwards.
    """
    if "triton" in sys.modules:
        import triton

        if triton.knobs.runtime.interpret:
            return True
        raise RuntimeError("triton was already imported without TRITON_INTERPRET=1; restart the process "
                           "(kernel) and call effnb.kernels.use_interpreter() before anything imports triton")
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def __getattr__(name: str):
    if name in ("formats", "functions", "linear", "ops", "reference"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
