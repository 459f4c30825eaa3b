"""Timing and memory measurement shared by every benchmark suite.

CUDA: CUDA events around each call, after warm-up, median of many repeats, each call queued behind a device-side
sleep that outlasts its launching (otherwise an op that takes less device time than the host needs to launch it
times the host: the first GPU session's small rows were flat at 0.3-2 ms whatever their size); the host's launch
time is recorded beside it (``host_median_ms``: above the device time, the op is launch-bound in eager). Peak
memory from ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU:
``time.perf_counter`` (the suite still runs on CPU at small sizes so it never rots; CPU numbers are not GPU
claims). Device peaks (dense bf16 matmul FLOP/s and copy bandwidth) are measured, not looked up, so rooflines
compare against this device on this day.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

RESULTS: list[dict[str, Any]] = []  # every record() of this session
ON_RECORD: list[Callable[[], None]] = []  # called after each record(): bench/conftest.py rewrites the results file


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    peak_memory_bytes: int | None  # above the memory allocated before the call; None on CPU
    host_median_ms: float  # the host's time in the call (CUDA: launching it; CPU: the same as median_ms)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}{key}": value for key, value in asdict(self).items()}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_HOLD_CAP_MS = 50.0  # the longest device-side sleep before a timed call


@functools.cache
def _sleep_cycles_per_ms(device: torch.device) -> float:
    """Clock cycles of ``torch.cuda._sleep`` per millisecond on ``device``, measured."""
    cycles = 5_000_000
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles)  # the first launch loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / start.elapsed_time(end)


def _hold_the_queue(device: torch.device, host_ms: float) -> None:
    """Device work outlasting ``host_ms`` of launching (twice over, plus 50 us), queued before the start event: the
    timed calls' kernels wait behind it instead of the device waiting for them."""
    torch.cuda._sleep(int(_sleep_cycles_per_ms(device) * (2 * host_ms + 0.05)))


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int = 5, repeats: int = 30,
            setup: Callable[[], Any] | None = None) -> Measurement:
    """Time ``fn()`` (after ``setup()``, which is not timed) and its peak memory on ``device``."""
    warmup_host_ms = []
    for _ in range(warmup):
        if setup is not None:
            setup()
        began = time.perf_counter()
        fn()
        warmup_host_ms.append((time.perf_counter() - began) * 1e3)
    # Fixed before timing: a call that syncs inside would otherwise wait out the sleep and lengthen the next one.
    hold_ms = min(statistics.median(warmup_host_ms) if warmup_host_ms else 1.0, _HOLD_CAP_MS)
    times: list[float] = []
    host_times: list[float] = []
    peak: int | None = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if setup is not None:
            setup()
        torch.cuda.synchronize(device)
        gc.collect()  # garbage of earlier cases freed now, not inside the measured call
        # The base read after the reset, which sets the peak to what is allocated then: the peak cannot fall below
        # it (read before, a collection in between made peaks negative).
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            if setup is not None:
                setup()
            _hold_the_queue(device, hold_ms)
            start.record()
            began = time.perf_counter()
            fn()
            host_times.append((time.perf_counter() - began) * 1e3)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            if setup is not None:
                setup()
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
        host_times = times
    return Measurement(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), repeats, peak,
                       statistics.median(host_times))


def measure_into(row: dict[str, Any], name: str, fn: Callable[[], Any], device: torch.device,
                 **options: Any) -> Measurement | None:
    """:func:`measure` ``fn`` into ``row`` as ``<name>_ms`` and ``<name>_peak_mb``; "oom" and None if it does not
    fit (the other implementations of the row are still measured)."""
    try:
        measured = measure(fn, device, **options)
    except torch.OutOfMemoryError:
        row[f"{name}_ms"] = "oom"
        torch.cuda.empty_cache()
        return None
    row[f"{name}_ms"] = measured.median_ms
    row[f"{name}_spread"] = (measured.p80_ms - measured.p20_ms) / measured.median_ms  # 20th-80th percentile, relative
    if device.type == "cuda":
        row[f"{name}_host_ms"] = measured.host_median_ms
    if measured.peak_mb is not None:
        row[f"{name}_peak_mb"] = measured.peak_mb
    return measured


def measure_against(row: dict[str, Any], steps: dict[str, Callable[[], Any]], device: torch.device,
                    floor: tuple[str, float] | None = None, **options: Any) -> None:
    """:func:`measure_into` every implementation in ``steps`` (ours is ``"lamelm"``, measured first), then ours
    against each other one that ran: ``time_vs_<name>`` and ``memory_vs_<name>`` (ours / theirs: below 1 is better).
    ``floor`` = (name, ms), the physical floor of the op: ``<name>_ms`` and our share of it, ``<name>_fraction``.

    A reference or peer that fails (a peer's API changed between releases, torch.compile meets another Triton)
    leaves ``<name>_error`` in the row instead of taking the row, and ours with it, down; ours must run."""
    if floor is not None:
        row[f"{floor[0]}_ms"] = floor[1]
    for name, step in steps.items():
        if name == "lamelm":
            measure_into(row, name, step, device, **options)
            continue
        try:
            measure_into(row, name, step, device, **options)
        except Exception as error:  # noqa: BLE001 - any failure of theirs is recorded, not raised
            row[f"{name}_ms"] = "error"
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
    ours = row["lamelm_ms"]
    for name in steps:
        if name != "lamelm" and isinstance(ours, float) and isinstance(row.get(f"{name}_ms"), float):
            row[f"time_vs_{name}"] = ours / row[f"{name}_ms"]
            compare_memory(row, name)
    if floor is not None and isinstance(ours, float):  # (ours "oom": the row keeps the others' numbers)
        row[f"{floor[0]}_fraction"] = floor[1] / ours


def compiled_for_one_case(fn: Callable[..., Any], backend: str | Callable[..., Any] = "inductor",
                          ) -> Callable[..., Any]:
    """``torch.compile(fn)`` for one case, dynamo's caches reset first. One compiled function shared by every case
    meets dynamo's recompile limit (8 shapes) and from then on silently runs eager: the recorded "torch_compile"
    columns of the later cases were eager's."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=backend)


def compare_memory(row: dict[str, Any], name: str) -> None:
    """``memory_vs_<name>``, ours / theirs; where theirs allocates nothing (in place), no ratio exists, and
    ``memory_extra_mb_vs_<name>`` shows what ours takes beyond it instead of leaving the loss out."""
    mine, theirs = row.get("lamelm_peak_mb"), row.get(f"{name}_peak_mb")
    if mine is None or theirs is None:
        return
    if theirs > 0:
        row[f"memory_vs_{name}"] = mine / theirs
    else:
        row[f"memory_extra_mb_vs_{name}"] = mine - theirs


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device sync, for pytest-benchmark's wall-clock timer (it has no device timing)."""

    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


@functools.cache
def device_peaks(device: torch.device) -> dict[str, float]:
    """Measured dense bf16 (fp32 on CPU) matmul FLOP/s and device-to-device copy bytes/s on ``device``."""
    if device.type == "cuda":
        n, dtype, copy_numel = 8192, torch.bfloat16, 2**28
    else:
        n, dtype, copy_numel = 512, torch.float32, 2**22
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    matmul = measure(lambda: torch.mm(a, b, out=out), device, warmup=5, repeats=20)
    src = torch.empty(copy_numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, warmup=5, repeats=20)
    return {"matmul_flops": 2 * n**3 / (matmul.median_ms / 1e3),
            "copy_bytes_per_second": 2 * src.numel() * src.element_size() / (copy.median_ms / 1e3),
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def record(suite: str, case: dict[str, Any]) -> dict[str, Any]:
    """Keep one result row (a dict of plain numbers and strings) for the session's results file."""
    row = {"suite": suite, **case}
    RESULTS.append(row)
    for callback in ON_RECORD:
        callback()
    return row
