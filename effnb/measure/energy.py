"""Energy counters: NVIDIA's total-energy counter on GPU, Intel/AMD RAPL on CPU where readable.

Where no counter can be read, the figure is ``None`` and ``reason`` says why; no energy figure is
ever estimated from a power rating.
"""

from __future__ import annotations

import glob


class EnergyMeter:
    """Context manager reading an energy counter before and after; ``.joules`` or ``None``."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.joules: float | None = None
        self.method = "not measured"
        self.reason: str | None = None
        self._read = self._find_counter()

    def _find_counter(self):
        if self.device.startswith("cuda"):
            try:
                import pynvml  # from the nvidia-ml-py package
            except ImportError:
                self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
                return None
            try:
                pynvml.nvmlInit()
                import torch

                # by UUID: CUDA's device order (CUDA_VISIBLE_DEVICES, PCI order) need not be NVML's
                uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except Exception as exc:  # noqa: BLE001 - NVML raises its own error types
                self.reason = f"NVML energy counter not readable: {exc}"
                return None
            self._source = "NVML total energy (whole GPU)"
            return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
        paths = sorted(glob.glob("/sys/class/powercap/intel-rapl:[0-9]*/energy_uj"))
        if not paths:
            self.reason = "no RAPL counter exposed by the kernel (/sys/class/powercap)"
            return None
        try:
            for p in paths:
                with open(p) as f:
                    int(f.read())
        except (OSError, ValueError) as exc:
            self.reason = f"RAPL counter not readable ({exc.__class__.__name__}; usually needs root)"
            return None
        self._source = "RAPL package energy (whole socket, other processes included)"

        def read() -> float:
            total = 0
            for p in paths:
                with open(p) as f:
                    total += int(f.read())
            return total / 1e6

        return read

    @property
    def available(self) -> bool:
        return self._read is not None

    def __enter__(self) -> EnergyMeter:
        if self._read is not None:
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        if self._read is None:
            return
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        delta = self._read() - self._start
        if delta < 0:  # RAPL counters wrap around
            self.reason = "energy counter wrapped during the measurement"
            return
        self.joules = delta
        self.method = f"measured: {self._source}"
