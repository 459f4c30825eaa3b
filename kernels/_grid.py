"""Grid sizes and launch arithmetic shared by the launch functions.

``cdiv`` and ``next_power_of_2`` are plain integer functions for host code: ``triton.cdiv`` and
``triton.next_power_of_2`` are constexpr functions (Triton 3.x) that unwrap every argument through the compiler's
constexpr machinery, a few microseconds per call, and a training step makes a few thousand such calls.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, per_sm: int, elsewhere: int) -> int:
    """``per_sm`` programs per streaming multiprocessor of a CUDA ``device``; ``elsewhere`` (the interpreter, or a
    compile-only run on CPU tensors) a few, each looping over several tiles so the loops are exercised."""
    if device.type != "cuda":
        return elsewhere
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n``, and 0 for 0, as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
