"""Build and load effnb's CPU kernels (``qlinear.cpp`` beside this file) on first use.

The source has a plain C ABI and includes no torch headers, so ``g++`` builds it in about a second
(a ``torch.utils.cpp_extension`` build of the same code takes ~40 s on 2 cores). The library is
loaded with ``ctypes`` from ``~/.cache/effnb/ext/<hash of source, compiler and flags>/``.

Loading native code is guarded: the build directory is created with mode 0700 and must belong to
this user and be writable by no one else (otherwise the build goes to a private directory under
the system's temporary folder, or the reference path runs); the library's SHA-256 is recorded at
build time in ``libeffnb_quant.so.sha256`` and checked before ``ctypes.CDLL`` (a mismatch
rebuilds); the compiler is ``EFFNB_CXX`` when set, else the first of g++, c++, clang++ on PATH
(an inherited ``$CXX`` is never run). Every kernel returns a status: a failed allocation becomes
a one-line ``MemoryError`` naming the buffer and its size, never a crash.

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
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("qlinear.cpp")
_FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-pthread", "-shared", "-fPIC"]
_ABI = 9
_COMPILERS = ("g++", "c++", "clang++")
_LIB_NAME = "libeffnb_quant.so"

_lib: ctypes.CDLL | None = None
_status: dict = {"loaded": False, "reason": "not built yet", "path": None}

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
# every kernel returns 0, or 1 (allocation failed) / 2 (other failure) / 3 (inconsistent sizes): see _errcheck
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
    "effnb_quantize_rtn": [_p, _i64, _i64, _i64, ctypes.c_int, _p, _p, _p, _p, ctypes.c_int],
    "effnb_nf4_search": [_p, _i64, _i64, _p, _p, _p, ctypes.c_float, ctypes.c_float, ctypes.c_int, _p, _p, _p,
                         ctypes.c_int],
}
_UNCHECKED = {  # cannot fail: no status
    "effnb_set_decode_threading": ([ctypes.c_int], None),
    "effnb_decode_threading_stats": ([_p], None),
    "effnb_last_error": ([ctypes.c_char_p, _i64], _i64),
    "effnb_note_fork": ([], None),
}


def _after_fork_in_child() -> None:
    _status["forked"] = True  # a library loaded later in this child must not use OpenMP (see library())


os.register_at_fork(after_in_child=_after_fork_in_child)


def _errcheck(result, func, args):
    """ctypes hook on every kernel: a non-zero status becomes one Python exception."""
    if result != 0:
        raise_status(result, getattr(func, "__name__", "kernel"))
    return result


def unchecked(name: str):
    """A second handle on kernel ``name`` without the ``_errcheck`` hook (a Python call, ~0.3-1 us),
    for the decode closures that call it hundreds of times a token: they test the status themselves
    and call ``raise_status`` when it is not 0."""
    fn = _lib[name]  # indexing makes a new function object; attribute access returns the checked one
    fn.argtypes, fn.restype = _SIGNATURES[name], ctypes.c_int
    return fn


def raise_status(result: int, name: str) -> None:
    """Raise the MemoryError / RuntimeError for a kernel's non-zero status (see qlinear.cpp)."""
    buf = ctypes.create_string_buffer(256)
    size = _lib.effnb_last_error(buf, 256) if _lib is not None else -1
    what = buf.value.decode(errors="replace") or name
    if result == 1:
        fn, _, buffer = what.partition(": ")
        amount = f"{size} bytes" if size >= 0 else "size unknown"
        raise MemoryError(f"effnb CPU kernel {fn}: out of memory allocating {buffer or 'a buffer'} ({amount})")
    if result == 3:
        raise ValueError(f"effnb CPU kernel {what}")
    raise RuntimeError(f"effnb CPU kernel {what} failed")


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


def compiler() -> str:
    """The C++ compiler's path: ``EFFNB_CXX`` if set, else the first of g++, c++, clang++ on PATH."""
    explicit = os.environ.get("EFFNB_CXX")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise RuntimeError(f"EFFNB_CXX={explicit!r} is not an executable (on PATH or as a path)")
        return found
    if os.environ.get("CXX"):
        log.info("ignoring $CXX (%s): effnb runs g++, c++ or clang++ from PATH, or EFFNB_CXX", os.environ["CXX"])
    for name in _COMPILERS:
        found = shutil.which(name)
        if found is not None:
            return found
    raise RuntimeError("no C++ compiler (none of g++, c++, clang++ on PATH; install g++, e.g. apt-get install g++, "
                       "or set EFFNB_CXX)")


def _unsafe_ancestor(path: Path) -> str | None:
    """Why someone else could replace ``path`` through one of its parents (None if no one can)."""
    uid = os.geteuid()
    for parent in path.absolute().parents:
        try:
            st = os.stat(parent)
        except OSError:
            continue
        if st.st_uid not in (uid, 0):
            return f"{parent} belongs to uid {st.st_uid}"
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            return f"{parent} is writable by everyone"
    return None


def _private_dir(path: Path) -> str | None:
    """Create ``path`` with mode 0700 if missing; None if only this user can write it, else why not."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o022:
        return f"{path} is writable by its group or others (mode {oct(st.st_mode & 0o777)})"
    if st.st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
    return _unsafe_ancestor(path)


def _build_dir(cxx: str) -> Path:
    """A private directory for this source, compiler and flags (see the module docstring)."""
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cxx, *_FLAGS, str(_ABI)]).encode()).hexdigest()[:16]
    roots = [Path(os.environ.get("EFFNB_CACHE", Path.home() / ".cache" / "effnb")) / "ext",
             Path(tempfile.gettempdir()) / f"effnb-{os.geteuid()}" / "ext"]
    reasons = []
    for root in roots:
        why = _private_dir(root) or _private_dir(root / key)
        if why is None:
            return root / key
        log.warning("not building effnb CPU kernels in %s: %s", root, why)
        reasons.append(why)
    raise RuntimeError(f"no private directory to build the kernels in ({'; '.join(reasons)})")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _compile(target: Path, cxx: str) -> None:
    # build to a temporary name, record its hash, then rename: concurrent first uses never load a
    # half-written file, and a library that is not the one built here fails the check in _verify
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [cxx, *_FLAGS, str(_SOURCE), "-o", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp_path, 0o700)
        digest = _digest_file(target)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".sha256", delete=False) as f:
            f.write(_sha256(tmp_path) + "\n")
        os.replace(f.name, digest)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _verify(target: Path) -> str | None:
    """None if ``target`` is this user's regular file and matches the SHA-256 recorded at build time."""
    try:
        st = os.lstat(target)
        recorded = _digest_file(target).read_text().strip()
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return f"{target} is not a private regular file of this user"
    if _sha256(target) != recorded:
        return f"{target} does not match the SHA-256 recorded when it was built"
    return None


def _open(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    if lib.effnb_abi_version() != _ABI:
        raise RuntimeError(f"stale library {target} (ABI {lib.effnb_abi_version()} != {_ABI})")
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype, fn.errcheck = args, ctypes.c_int, _errcheck
    for name, (args, res) in _UNCHECKED.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if _status.get("forked"):
        lib.effnb_note_fork()
    return lib


def _load() -> ctypes.CDLL:
    cxx = compiler()
    target = _build_dir(cxx) / _LIB_NAME
    why = _verify(target) if target.exists() else "not built yet"
    if why is not None:
        if target.exists():
            log.warning("rebuilding effnb CPU kernels: %s", why)
        log.info("building effnb CPU kernels: %s", target)
        _compile(target, cxx)
        why = _verify(target)
        if why is not None:
            raise RuntimeError(why)
    lib = _open(target)
    _status.update(path=str(target))
    return lib


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
        try:
            _lib = _load()
            _status.update(loaded=True, reason=None)
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
    """How the decode kernels use threads (see qlinear.cpp, ``pool`` and ``over_rows``).

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


if __name__ == "__main__":  # python -m effnb.kernels.cpu : build now and say what happened
    logging.basicConfig(level=logging.INFO)
    library()
    print(status())
    sys.exit(0 if _status["loaded"] else 1)
