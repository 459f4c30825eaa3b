"""GpuMonitor against the real NVML of this machine and against a scripted fake pynvml."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from lamelm_fast.metrics.gpu import FIELDS, GpuMonitor, torch_peak_memory_gb


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """A pynvml stand-in: every reading differs from the previous one and is recorded, power is unsupported."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: bool = False, fail_handle: bool = False, temperature_fails_every: int = 0) -> None:
        self.fail_init = fail_init
        self.fail_handle = fail_handle
        self.temperature_fails_every = temperature_fails_every
        self.lock = threading.Lock()
        self.utilization: list[int] = []
        self.memory_used: list[int] = []
        self.temperature: list[int] = []
        self.temperature_calls = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if self.fail_handle:
            raise FakeNVMLError("Invalid Argument")
        return f"handle-{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA H100 80GB HBM3"  # bytes, as an old pynvml returns

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        with self.lock:
            self.utilization.append(10 + 7 * len(self.utilization) % 90)
            return SimpleNamespace(gpu=self.utilization[-1], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        with self.lock:
            self.memory_used.append(1_500_000_000 * (len(self.memory_used) + 1))
            return SimpleNamespace(used=self.memory_used[-1], total=80_000_000_000, free=0)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        raise FakeNVMLError("Not Supported")

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        with self.lock:
            self.temperature_calls += 1
            if self.temperature_fails_every and self.temperature_calls % self.temperature_fails_every == 0:
                raise FakeNVMLError("Unknown Error")
            self.temperature.append(40 + self.temperature_calls)
            return self.temperature[-1]


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    module = FakeNvml(temperature_fails_every=3)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def real_nvml_works() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_nvml_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a driver everything is None and nothing is printed; with one (a GPU machine) readings are real."""
    expected = real_nvml_works()
    monitor = GpuMonitor(interval=0.01)
    assert monitor.available is expected
    monitor.start()
    time.sleep(0.05)
    values = monitor.window()
    monitor.stop()
    monitor.stop()
    assert set(values) == set(FIELDS)
    if expected:
        assert isinstance(monitor.name, str) and monitor.name
        assert values["gpu_memory_total_gb"] > 1 and 0 <= values["gpu_util"] <= 100
    else:
        assert monitor.name is None and all(value is None for value in values.values())
        assert monitor.window() == dict.fromkeys(FIELDS)
        assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("failure", ["import", "init", "handle"])
def test_unavailable_without_driver_or_device(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              failure: str) -> None:
    module = FakeNvml(fail_init=failure == "init", fail_handle=failure == "handle")
    monkeypatch.setitem(sys.modules, "pynvml", None if failure == "import" else module)
    with GpuMonitor(interval=0.01) as monitor:
        assert not monitor.available and monitor.name is None
        assert monitor.window() == dict.fromkeys(FIELDS)
    assert module.utilization == []  # never read
    assert module.shutdowns == (1 if failure == "handle" else 0)  # an init that succeeded is balanced
    assert capsys.readouterr() == ("", "")


def test_background_thread_samples_and_window_averages_them(fake: FakeNvml) -> None:
    monitor = GpuMonitor(interval=0.01)
    assert monitor.available and monitor.name == "NVIDIA H100 80GB HBM3"
    monitor.start()
    time.sleep(0.12)
    monitor.stop()
    assert not any(thread.name == "GpuMonitor" for thread in threading.enumerate())
    sampled = len(fake.utilization)
    time.sleep(0.03)
    assert len(fake.utilization) == sampled  # stopped means no more readings
    assert sampled >= 4, sampled
    assert fake.shutdowns == 1

    values = monitor.window()
    assert values["gpu_util"] == pytest.approx(mean(fake.utilization))
    assert values["gpu_memory_used_gb"] == pytest.approx(mean(fake.memory_used) / 1e9)
    assert values["gpu_memory_total_gb"] == pytest.approx(80.0)
    assert values["gpu_power_w"] is None
    # Every third temperature reading failed: the mean is over the ones that succeeded.
    assert fake.temperature_calls == sampled and len(fake.temperature) < sampled
    assert values["gpu_temperature_c"] == pytest.approx(mean(fake.temperature))

    # The window was reset, and a stopped monitor does not read NVML again after shutting it down.
    assert monitor.window() == dict.fromkeys(FIELDS)
    assert len(fake.utilization) == sampled
    monitor.stop()
    assert fake.shutdowns == 1


def test_window_without_samples_reads_synchronously_then_resets(fake: FakeNvml) -> None:
    monitor = GpuMonitor(interval=60.0)  # never started: every window takes exactly one reading itself
    first = monitor.window()
    second = monitor.window()
    monitor.stop()
    assert fake.utilization == [10, 17]
    assert (first["gpu_util"], second["gpu_util"]) == (10.0, 17.0)
    assert (first["gpu_memory_used_gb"], second["gpu_memory_used_gb"]) == (pytest.approx(1.5), pytest.approx(3.0))
    assert (first["gpu_temperature_c"], second["gpu_temperature_c"]) == (41.0, 42.0)
    assert first["gpu_power_w"] is None


def test_sampling_thread_survives_failing_readings(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(handle: str) -> None:
        raise FakeNVMLError("GPU is lost")

    monkeypatch.setattr(fake, "nvmlDeviceGetUtilizationRates", broken)
    monkeypatch.setattr(fake, "nvmlDeviceGetMemoryInfo", broken)
    with GpuMonitor(interval=0.01) as monitor:
        time.sleep(0.05)
        assert any(thread.name == "GpuMonitor" for thread in threading.enumerate())
        values = monitor.window()
    assert values["gpu_util"] is None and values["gpu_memory_used_gb"] is None
    assert values["gpu_temperature_c"] is not None


def test_torch_peak_memory_gb_is_none_off_cuda() -> None:
    assert torch_peak_memory_gb(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_peak_memory_gb_on_cuda() -> None:
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(250_000_000, dtype=torch.uint8, device=device)
    assert torch_peak_memory_gb(device) >= 0.25
    del block
