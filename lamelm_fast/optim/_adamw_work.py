"""What one FusedAdamW step works on, handed from the optimizer to a backend (torch, Triton or CUDA).

The optimizer gathers the local tensors of every parameter that has a gradient (`StepTensors`) and splits them
into `Bucket`s of tensors that one kernel launch can take: same param dtype, grad dtype, master-copy and
stochastic-rounding switches, and the same cross-rank reduction domain for the norm. Between steps the optimizer
keeps the same `StepTensors` object and only swaps in the new gradients while nothing else changed, so a backend
may cache whatever it derives from the other fields for as long as it is handed the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of params and gradients, on every backend


@dataclass
class StepTensors:
    """Parallel lists, one entry per parameter with a gradient, in param-group order (local shards for DTensor)."""

    device: torch.device
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    grad_ptrs: list[int] = field(default_factory=list)  # data_ptr() of each grad, read once per step
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    masters: list[Tensor | None] = field(default_factory=list)  # fp32 master copy, or None
    steps: list[Tensor] = field(default_factory=list)  # 0-dim fp32 step counters
    groups: list[int] = field(default_factory=list)  # index into the optimizer's param_groups
    param_ids: list[int] = field(default_factory=list)  # position among all params: stable stochastic-rounding key
    single_device: bool = True


@dataclass(frozen=True)
class BucketKey:
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    master: bool
    stochastic: bool
    # Process groups to sum this bucket's squared norm over (sharded DTensor grads); () = already global.
    domain: tuple[Any, ...]


@dataclass(frozen=True)
class Bucket:
    key: BucketKey
    indices: tuple[int, ...]  # positions in StepTensors


def upload(values: list | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A device copy of a host table without a host sync (pinned staging buffer + async copy on CUDA)."""
    table = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


class HyperTable:
    """The per-group fp64 hyperparameter table the kernels read (so LR changes need no recompile).

    Re-uploaded only when a value changes; a Tensor LR is copied in on the device (no host read).
    """

    def __init__(self, row: Any) -> None:
        self._row = row  # the kernel module's row packer
        self._values: list | None = None
        self._table: Tensor | None = None

    def get(self, param_groups: list[dict[str, Any]], device: torch.device) -> Tensor:
        values = [self._row(0.0 if isinstance(g["lr"], Tensor) else g["lr"], *g["betas"], g["eps"],
                            g["weight_decay"], g["max_grad_norm"]) for g in param_groups]
        if values != self._values or self._table is None or self._table.device != device:
            self._table, self._values = upload(values, torch.float64, device), values
        tensor_lrs = [(i, g["lr"]) for i, g in enumerate(param_groups) if isinstance(g["lr"], Tensor)]
        if not tensor_lrs:
            return self._table
        table = self._table.clone()
        for i, lr in tensor_lrs:
            table[i, 0] = lr
        return table
