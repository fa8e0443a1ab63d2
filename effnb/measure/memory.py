"""Parameters, weight bytes and peak memory.

Weight bytes are counted from the state dict (what a checkpoint holds: packed quantized weights,
scales and zeros included), each storage once, so tied embeddings are not counted twice.
Peak memory is the weight bytes plus the transient peak measured while the model runs (process
resident set on CPU, reset through /proc/self/clear_refs; the CUDA caching allocator's peak on GPU),
so variants held side by side in one process are measured fairly.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict


def _logical_numel(param) -> int:
    # bitsandbytes 4-bit parameters pack two weights per byte; their quant_state knows the shape
    qs = getattr(param, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        n = 1
        for s in shape:
            n *= int(s)
        return n
    return param.numel()


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) logical parameters, each storage counted once.

    Modules that keep weights in packed buffers (effnb's QuantLinear) report their logical
    count through an ``effnb_logical_numel()`` method.
    """
    seen: set[tuple[int, int]] = set()
    total = trainable = 0
    for module in model.modules():
        logical = getattr(module, "effnb_logical_numel", None)
        if callable(logical):
            total += int(logical())
        for p in module.parameters(recurse=False):
            key = (p.data_ptr(), p.numel())
            if key in seen:
                continue
            seen.add(key)
            n = _logical_numel(p)
            total += n
            if p.requires_grad:
                trainable += n
    return total, trainable


def _owner_kinds(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


def weight_bytes(model) -> tuple[int, dict[str, int], dict[str, int]]:
    """(total bytes, bytes by dtype, bytes by module class) of the model's state dict."""
    import torch

    owners = _owner_kinds(model)
    by_dtype: dict[str, int] = defaultdict(int)
    by_kind: dict[str, int] = defaultdict(int)
    seen: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset() * t.element_size() + t.nbytes) if t.numel() else (id(t), 0)
        if ident in seen:
            continue
        seen.add(ident)
        parts = key.split(".")
        kind = type(model).__name__
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in owners:
                kind = owners[prefix]
                break
        by_dtype[str(t.dtype).replace("torch.", "")] += t.nbytes
        by_kind[kind] += t.nbytes
    return sum(by_dtype.values()), dict(sorted(by_dtype.items())), dict(sorted(by_kind.items()))


_LIBC = None


def trim_heap() -> None:
    """Give the memory that freed tensors left in glibc's heap back to the operating system.

    Quantizing creates and frees many layer-sized temporaries; glibc keeps freed blocks below its
    (adaptive, up to 32 MB) mmap threshold in the heap, so the process's resident memory, what
    Binder's 2 GB limit counts, stays up to ~0.9 GB above what is live (measured on SmolLM2: 2.20 GB
    resident after a GPTQ run, 1.34 GB after this call). ``malloc_trim(0)`` returns those pages
    (milliseconds). No-op where the C library is not glibc.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - raises AttributeError if this libc has none
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


class PeakMemory:
    """Context manager: transient peak memory of the code inside, in bytes (``.peak_bytes``).

    CUDA: ``max_memory_allocated`` minus the allocation on entry. CPU: the rise of the process's
    peak resident set (VmHWM, reset on entry through /proc/self/clear_refs); where that reset is
    not allowed, a sampling thread (1 ms) stands in and ``method`` says so.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._base = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _hwm_bytes()
            self.method = "process peak RSS (VmHWM after clear_refs)"
            self._sampler = None
        except OSError:
            self.method = "process RSS sampled every 1 ms"
            self._stop = threading.Event()
            self._max = self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._base)
            return
        if self._sampler is None:
            self.peak_bytes = max(0, _hwm_bytes() - self._base)
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = max(0, max(self._max, _rss_bytes()) - self._base)
