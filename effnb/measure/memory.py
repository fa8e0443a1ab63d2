"""Parameters, weight bytes and peak memory.

Weight bytes are counted from the state dict (what a checkpoint holds: packed quantized weights,
scales and zeros included), each storage once, so tied embeddings are not counted twice.
Peak memory is the weight bytes plus the transient peak measured while the model runs (process
resident set on CPU, reset through /proc/self/clear_refs; the CUDA caching allocator's peak on GPU),
so variants held side by side in one process are measured fairly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict

log = logging.getLogger(__name__)


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




def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


#: longest wait for another thread's measurement before measuring anyway (the figure is then marked shared)
MAX_WAIT_S = 120.0


class _MeasureLock:
    """Measured regions of different threads do not overlap; regions nested in one thread do.

    Peak memory is a process-wide figure (peak RSS, the CUDA allocator's peak), so two regions measured
    at once in two threads would each report the other's memory. A region entered while another
    thread measures waits for it (and says so in the log). A wait longer than ``MAX_WAIT_S`` (a
    training in another thread, or a thread that waits for this one) goes ahead instead of hanging,
    and every region open at that moment is marked shared. Regions nested in one thread (an audit
    inside ``%%efficient``) go ahead at once; the outer one keeps the peaks the inner one reset.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self.active: list[PeakMemory] = []  # open regions of every thread (guarded by _cond)

    def enter(self, region: PeakMemory) -> None:
        me = threading.get_ident()
        with self._cond:
            if region.exclusive and self._owner not in (None, me):
                t0 = time.perf_counter()
                log.warning("effnb: another thread is measuring peak memory; this measurement waits for it "
                            "(at most %.0f s) so that neither reports the other's memory", MAX_WAIT_S)
                self._cond.wait_for(lambda: self._owner in (None, me), timeout=MAX_WAIT_S)
                region.waited_s = time.perf_counter() - t0
            if region.exclusive and self._owner in (None, me):
                self._owner = me
                self._depth += 1
                region._owns = True
            others = [r for r in self.active if r._thread != me]
            for r in [*others, region] if others else []:
                r.shared = True  # regions of two threads overlap: each figure includes the other's memory
            self.active.append(region)

    def leave(self, region: PeakMemory) -> None:
        with self._cond:
            self.active.remove(region)
            if region._owns:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()

    def carry(self, resetting: PeakMemory, peak: int) -> None:
        """``resetting`` resets the peak counter: every other open region keeps the peak it held."""
        cuda = resetting.device.startswith("cuda")
        with self._cond:
            for r in self.active:
                if r is not resetting and r.device.startswith("cuda") == cuda:
                    r._carried = max(r._carried, peak)


_LOCK = _MeasureLock()


class PeakMemory:
    """Context manager: transient peak memory of the code inside, in bytes (``.peak_bytes``).

    CUDA: ``max_memory_allocated`` minus the allocation on entry. CPU: the rise of the process's
    peak resident set (VmHWM, reset on entry through /proc/self/clear_refs); where that reset is
    not allowed, a sampling thread (1 ms) stands in and ``method`` says so.

    Both are process-wide figures, so measured regions of different threads do not overlap: a
    region entered while another thread measures waits for it (``waited_s``, and a log line; see
    ``_MeasureLock``). When they overlap anyway (a wait over ``MAX_WAIT_S``, or a region with
    ``exclusive=False`` such as a measured notebook cell), ``shared`` is True and ``method`` says
    the figure includes the other measurement's memory. Memory another thread allocates outside any
    measured region counts too: the figure is the process's.
    """

    def __init__(self, device: str = "cpu", *, exclusive: bool = True):
        self.device = device
        self.exclusive = exclusive
        self.peak_bytes = 0
        self.method = ""
        self.waited_s = 0.0
        self.shared = False
        self._owns = False
        self._thread = threading.get_ident()
        self._carried = 0  # the highest peak seen before another region reset the counter

    def _reset(self) -> None:
        """Reset the process's peak counter, keeping what it held for the regions already open."""
        cuda = self.device.startswith("cuda")
        _LOCK.carry(self, _cuda_peak() if cuda else _hwm_bytes())
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def __enter__(self) -> PeakMemory:
        self._thread = threading.get_ident()
        _LOCK.enter(self)
        try:
            self._start()
        except BaseException:
            _LOCK.leave(self)
            raise
        return self

    def _start(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self._reset()
            self._base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return
        self._base = _rss_bytes()
        self._sampler = None
        try:
            _hwm_bytes()
            self._reset()
            self.method = "process peak RSS (VmHWM after clear_refs)"
        except OSError:
            self.method = "process RSS sampled every 1 ms"
            self._stop = threading.Event()
            self._max = self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        try:
            self._finish()
        finally:
            _LOCK.leave(self)
        if self.shared:
            self.method += "; shared: another measurement ran at the same time, its memory is included"

    def _finish(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(0, max(self._carried, _cuda_peak()) - self._base)
        elif self._sampler is None:
            self.peak_bytes = max(0, max(self._carried, _hwm_bytes()) - self._base)
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = max(0, max(self._max, _rss_bytes()) - self._base)


def _cuda_peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated()
