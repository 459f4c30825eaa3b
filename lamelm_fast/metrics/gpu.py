"""GPU utilisation, memory, power and temperature, sampled from NVML on a background thread.

The training step never waits on this: a daemon thread reads NVML every ``interval`` seconds and the loop collects
the averages at logging steps with :meth:`GpuMonitor.window`. Without a driver (or without ``pynvml``) the monitor
is simply unavailable and reports ``None`` everywhere.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import Any

import torch

FIELDS = ("gpu_util", "gpu_memory_used_gb", "gpu_memory_total_gb", "gpu_power_w", "gpu_temperature_c")


def torch_peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by torch's caching allocator on ``device``, in GB (1e9 bytes); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _nvml_handle(pynvml: ModuleType, device_index: int | None) -> Any:
    if not torch.cuda.is_available():
        return pynvml.nvmlDeviceGetHandleByIndex(0 if device_index is None else device_index)
    index = torch.cuda.current_device() if device_index is None else device_index
    # CUDA numbers devices after CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, NVML numbers every device in PCI order:
    # the UUID names the same physical GPU in both. Fall back to the ordinal when it cannot be matched.
    try:
        uuid = torch.cuda.get_device_properties(index).uuid
    except (AssertionError, RuntimeError, AttributeError):  # a bad ordinal, or a torch without uuid
        uuid = None
    if uuid is not None:
        with contextlib.suppress(pynvml.NVMLError):
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class GpuMonitor:
    """Averages of NVML readings over the windows between :meth:`window` calls.

    ``device_index`` is a CUDA ordinal as torch numbers it (None: the current CUDA device, or 0 without CUDA).
    """

    def __init__(self, device_index: int | None = None, interval: float = 0.5) -> None:
        self.interval = interval
        self.available = False
        self.name: str | None = None
        self._pynvml: ModuleType | None = None
        self._handle: Any = None
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reset()
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return  # no driver: a CPU machine, or a GPU we cannot see
        try:
            self._handle = _nvml_handle(pynvml, device_index)
            name = pynvml.nvmlDeviceGetName(self._handle)
        except pynvml.NVMLError:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
            return
        self.name = name.decode() if isinstance(name, bytes) else name  # pynvml < 11.5 returns bytes
        self._pynvml = pynvml
        self.available = True

    def _reset(self) -> None:
        self._samples = 0
        self._sums = dict.fromkeys(FIELDS, 0.0)
        self._counts = dict.fromkeys(FIELDS, 0)

    def _sample(self) -> dict[str, float | None]:
        pynvml, handle = self._pynvml, self._handle

        def read(function: Callable[[], Any]) -> Any:
            # One unsupported reading (power on some boards) must not cost the others.
            try:
                return function()
            except pynvml.NVMLError:
                return None

        utilization = read(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        memory = read(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        milliwatts = read(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        temperature = read(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        return {"gpu_util": None if utilization is None else float(utilization.gpu),
                "gpu_memory_used_gb": None if memory is None else memory.used / 1e9,
                "gpu_memory_total_gb": None if memory is None else memory.total / 1e9,
                "gpu_power_w": None if milliwatts is None else milliwatts / 1000.0,
                "gpu_temperature_c": None if temperature is None else float(temperature)}

    def _add(self, sample: dict[str, float | None]) -> None:
        with self._lock:
            self._samples += 1
            for key, value in sample.items():
                if value is not None:
                    self._sums[key] += value
                    self._counts[key] += 1

    def _run(self) -> None:
        while not self._stop_event.is_set():
            self._add(self._sample())
            self._stop_event.wait(self.interval)

    def start(self) -> None:
        if not self.available or self._closed or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="GpuMonitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join()
        if self.available:
            with contextlib.suppress(self._pynvml.NVMLError):
                self._pynvml.nvmlShutdown()

    def window(self) -> dict[str, float | None]:
        """Mean of each reading since the previous call (None where no reading succeeded), then start afresh."""
        if not self.available:
            return dict.fromkeys(FIELDS)
        # After stop() NVML is shut down: report what was sampled before, never read again.
        if not self._closed:
            with self._lock:
                empty = self._samples == 0
            if empty:
                self._add(self._sample())
        with self._lock:
            sums, counts = self._sums, self._counts
            self._reset()
        return {key: sums[key] / counts[key] if counts[key] else None for key in FIELDS}

    def __enter__(self) -> GpuMonitor:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
