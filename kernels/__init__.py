"""effnb.kernels: fused dequantize + matmul kernels (Triton) for int4, int8, NF4 and FP4 weights.

``effnb.kernels.interface`` holds the public functions and the ``torch.library`` ops
(``effnb::int4_linear`` ...); ``reference`` the pure-PyTorch ground truth; ``_triton`` the
kernels. Importing this package imports neither torch nor triton: the submodules load on use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["interface", "reference", "triton_available", "use_interpreter"]


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
    if name in ("interface", "reference"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
