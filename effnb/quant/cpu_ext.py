"""Build and load effnb's CPU kernels (``csrc/qlinear.cpp``) on first use.

The source has a plain C ABI and includes no torch headers, so ``g++`` builds it in about a second
(a ``torch.utils.cpp_extension`` build of the same code takes ~40 s on 2 cores). The library is
cached under ``~/.cache/effnb/ext/<hash of source and flags>/`` and loaded with ``ctypes``.

When there is no compiler, no AVX2/FMA/F16C, or the build fails, ``library()`` returns None once,
logs a warning saying why and that the pure-PyTorch reference path runs instead, and records the
reason in ``status()`` so reports can name the path that ran.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "qlinear.cpp"
_FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-pthread", "-shared", "-fPIC"]
_ABI = 8

_lib: ctypes.CDLL | None = None
_status: dict = {"loaded": False, "reason": "not built yet", "path": None}

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    "effnb_int4_linear": [_p, _i64, _i64, _i64, _p, _p, _p, _i64, _p, _p, ctypes.c_int],
    "effnb_lut4_linear": [_p, _i64, _i64, _i64, _p, _p, _p, _p, _p, ctypes.c_float, _i64, _i64, _p, _p, _p,
                          ctypes.c_int],
    "effnb_int8_linear": [_p, _i64, _i64, _i64, _p, _p, _i64, _p, _p, ctypes.c_int],
    "effnb_quantize_4bit": [_p, _i64, _i64, _p, _p, _p, _p, _p, _p, ctypes.c_int],
    "effnb_hqq": [_p, _i64, _i64, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                  ctypes.c_int, _p, _p, _p, _p, ctypes.c_int],
    "effnb_gptq_block": [_p, _i64, _i64, _p, _p, _p, ctypes.c_float, _i64, _i64, _i64, ctypes.c_float,
                         ctypes.c_float, _p, _p, ctypes.c_int],
    "effnb_int4_dequant": [_p, _p, _p, _i64, _i64, _i64, _p, ctypes.c_int],
    "effnb_int8_dequant": [_p, _p, _i64, _i64, _i64, _p, ctypes.c_int],
    "effnb_lut4_dequant": [_p, _p, _i64, _i64, _p, _p, ctypes.c_int],
    "effnb_set_decode_threading": [ctypes.c_int],
    "effnb_decode_threading_stats": [_p],
    "effnb_quantize_rtn": [_p, _i64, _i64, _i64, ctypes.c_int, _p, _p, _p, _p, ctypes.c_int],
    "effnb_nf4_search": [_p, _i64, _i64, _p, _p, _p, ctypes.c_float, ctypes.c_float, ctypes.c_int, _p, _p, _p,
                         ctypes.c_int],
}


def _cpu_supported() -> str | None:
    """None if the CPU has AVX2, FMA and F16C; else why not."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} is not x86-64"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "cannot read /proc/cpuinfo to check for AVX2"
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags.split()]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def _build_dir() -> Path:
    root = Path(os.environ.get("EFFNB_CACHE", Path.home() / ".cache" / "effnb"))
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    return root / "ext" / key


def _compile(target: Path) -> None:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found on PATH; install g++, e.g. apt-get install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # build to a temporary name, then rename: concurrent first uses never load a half-written file
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [compiler, *_FLAGS, str(_SOURCE), "-o", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
    os.replace(tmp_path, target)


def library(quiet: bool = False) -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None (with one warning) if unavailable.

    ``quiet``: a caller with its own PyTorch fallback for a non-essential speed-up (quantizing) asks
    without triggering the warning; the warning comes when a quantized layer first runs.
    """
    global _lib
    if _lib is not None or _status["reason"] != "not built yet":
        if _lib is None and not quiet:
            _warn_once()
        return _lib
    import torch  # noqa: F401 - load torch's libgomp first so the kernels share its OpenMP pool

    reason = _cpu_supported()
    if reason is None and os.environ.get("EFFNB_NO_CPU_EXT"):
        reason = "disabled by EFFNB_NO_CPU_EXT"
    if reason is None:
        target = _build_dir() / "libeffnb_quant.so"
        try:
            if not target.exists():
                log.info("building effnb CPU kernels: %s", target)
                _compile(target)
            lib = ctypes.CDLL(str(target))
            if lib.effnb_abi_version() != _ABI:
                raise RuntimeError(f"stale library {target} (ABI {lib.effnb_abi_version()} != {_ABI})")
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = None
            _lib = lib
            _status.update(loaded=True, reason=None, path=str(target))
            return _lib
        except (OSError, RuntimeError, AttributeError) as exc:
            reason = str(exc)
    _status.update(loaded=False, reason=reason)
    if not quiet:
        _warn_once()
    return None


def _warn_once() -> None:
    if _status.get("warned"):
        return
    _status["warned"] = True
    msg = (f"effnb CPU kernels unavailable ({_status['reason']}); quantized layers run the pure-PyTorch "
           "reference path (correct, slower)")
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def status() -> dict:
    """Whether the kernels are loaded, from where, or why not (for the report's environment)."""
    return dict(_status)


_THREADING = {"auto": 0, "openmp": 1, "pool": 2}


def set_decode_threading(mode: str) -> None:
    """How the decode kernels use threads (see csrc/qlinear.cpp, ``pool`` and ``over_rows``).

    "auto" (the default): torch's OpenMP threads, moving to effnb's own pool for 2 s when calls keep
    stalling on a thread that is not running (a busy machine); "openmp" or "pool" force one of the
    two (benchmarks/cpu_decode.py compares them in one run).
    """
    if mode not in _THREADING:
        raise ValueError(f"unknown decode threading {mode!r} (choices: {', '.join(_THREADING)})")
    lib = library(quiet=True)
    if lib is not None:
        lib.effnb_set_decode_threading(_THREADING[mode])


def decode_threading_stats() -> dict:
    """Since the library was loaded: "stalls" (OpenMP decode calls that waited over 1 ms for a thread),
    "switches" (times auto mode moved to the pool); "on_pool": whether it is on the pool now."""
    lib = library(quiet=True)
    if lib is None:
        return {"stalls": 0, "switches": 0, "on_pool": False}
    out = (ctypes.c_int64 * 3)()
    lib.effnb_decode_threading_stats(out)
    return {"stalls": int(out[0]), "switches": int(out[1]), "on_pool": bool(out[2])}


def num_threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


if __name__ == "__main__":  # python -m effnb.quant.cpu_ext : build now and say what happened
    logging.basicConfig(level=logging.INFO)
    library()
    print(status())
    sys.exit(0 if _status["loaded"] else 1)
