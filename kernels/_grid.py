"""Grid sizes shared by the kernels whose programs loop over their share of the work (persistent grids)."""

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
