"""Device-resident tensor and chunk tables, and the launch loop shared by the Triton and CUDA FusedAdamW backends.

Both backends' kernels read the same tables (kernels/adamw.py; csrc/adamw.cu mirrors the columns in adamw.h):

* the tensor table, int64 ``[tensors, META_WIDTH]``: data pointers of param, moments, master copy and step
  counter, numel, param group and a stable param id (``kernels.adamw.meta_row``);
* the gradient pointers, int64 ``[tensors]`` (apart: gradients are re-allocated every step, the rest stays put);
* one chunk table per bucket, int64 ``[chunks, 2]``: (tensor-table row, chunk index within that tensor).

So a step is one sum-of-squares and one update launch per bucket plus one finalize, whatever the number of tensors.
The tensor and chunk tables are built once per `StepTensors` object (the optimizer hands over the same object
while params, state and layout are unchanged) and uploaded only when their contents changed; the gradient
pointers are uploaded when one of them changed (every step on CPU, rarely with the CUDA caching allocator).
Uploads are asynchronous, from pinned memory: no host sync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from functools import reduce
from operator import or_
from typing import Any

import torch
from torch import Tensor

from lamelm_fast.kernels import adamw as kernels
from lamelm_fast.ops.dispatch import BackendUnavailable
from lamelm_fast.optim._adamw_work import Bucket, BucketKey, HyperTable, StepTensors, upload

_ALIGNMENT = 16  # bytes: what 16-byte vector loads and stores need of every pointer of a bucket


def _check_tensors(work: StepTensors, i: int, backend: str) -> None:
    """The layout the kernels assume for tensor ``i``; checked when the tables are built, not every step."""
    param, grad = work.params[i], work.grads[i]
    numel = param.numel()
    if not param.is_contiguous() or not grad.is_contiguous():
        raise BackendUnavailable(f"the {backend} FusedAdamW backend needs contiguous parameters and gradients")
    if grad.numel() != numel or grad.device != work.device:
        raise RuntimeError(f"FusedAdamW: a gradient of shape {tuple(grad.shape)} on {grad.device} for a param of "
                           f"shape {tuple(param.shape)} on {work.device}")
    for name, state, size in (("exp_avg", work.exp_avgs[i], numel), ("exp_avg_sq", work.exp_avg_sqs[i], numel),
                              ("master_param", work.masters[i], numel), ("step", work.steps[i], 1)):
        if state is not None and (state.dtype != torch.float32 or state.numel() != size
                                  or not state.is_contiguous() or state.device != work.device):
            raise RuntimeError(f"FusedAdamW: state {name!r} must be a contiguous fp32 tensor of {size} elements on "
                               f"{work.device}, got {state.dtype} {tuple(state.shape)} on {state.device}")


class DeviceTables:
    """The tables of one backend, refreshed at the start of every step (``refresh``).

    After ``refresh``: ``meta`` (tensor table) and ``grads`` (gradient pointers) on the device, ``chunks`` and
    ``aligned`` (per bucket: chunk table, and whether every pointer of the bucket is 16-byte aligned) and
    ``num_chunks`` (over all buckets).
    """

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._work: StepTensors | None = None  # the StepTensors that `meta` and `chunks` describe
        self._chunk_size = 0
        self._host: Tensor | None = None  # host copy of `meta`, to skip uploading an unchanged table
        self._fixed_aligned: list[bool] = []  # per bucket: every pointer but the gradients' aligned
        self._grad_ptrs: list[int] | None = None  # what `grads` holds
        self._chunk_key: tuple | None = None
        self.meta: Tensor | None = None
        self.grads: Tensor | None = None
        self.chunks: list[Tensor] = []
        self.aligned: list[bool] = []
        self.num_chunks = 0

    def refresh(self, work: StepTensors, buckets: list[Bucket], chunk_size: int) -> None:
        rebuilt = work is not self._work or chunk_size != self._chunk_size
        if rebuilt:
            self._build(work, buckets, chunk_size)
        ptrs = work.grad_ptrs
        if ptrs != self._grad_ptrs or self.grads.device != work.device:
            # A new tensor every time (never written in place): the last step's kernels may still read the old one.
            self.grads = upload(torch.frombuffer(array("q", ptrs), dtype=torch.int64), torch.int64, work.device)
            self._grad_ptrs = ptrs
        elif not rebuilt:  # the steady state on GPUs: the caching allocator re-uses the same blocks
            return
        if len(buckets) == 1:  # a single bucket holds every tensor
            grads_aligned = [reduce(or_, ptrs, 0) % _ALIGNMENT == 0]
        else:
            grads_aligned = [reduce(or_, [ptrs[i] for i in b.indices], 0) % _ALIGNMENT == 0 for b in buckets]
        self.aligned = [a and b for a, b in zip(self._fixed_aligned, grads_aligned, strict=True)]

    def _build(self, work: StepTensors, buckets: list[Bucket], chunk_size: int) -> None:
        flat: list[int] = []
        misaligned: list[int] = []
        numels: list[int] = []
        meta_row = kernels.meta_row
        for i, param in enumerate(work.params):
            _check_tensors(work, i, self._backend)
            master = work.masters[i]
            pointers = (param.data_ptr(), work.exp_avgs[i].data_ptr(), work.exp_avg_sqs[i].data_ptr(),
                        0 if master is None else master.data_ptr())
            misaligned.append(reduce(or_, pointers) % _ALIGNMENT)
            numels.append(param.numel())
            flat.extend(meta_row(*pointers, work.steps[i].data_ptr(), numels[-1], work.groups[i], work.param_ids[i]))
        table = torch.frombuffer(array("q", flat), dtype=torch.int64).view(len(numels), kernels.META_WIDTH)
        if self._host is None or self.meta.device != work.device or not torch.equal(table, self._host):
            self.meta, self._host = upload(table, torch.int64, work.device), table
        self._fixed_aligned = [not any(misaligned[i] for i in b.indices) for b in buckets]
        self._work, self._chunk_size = work, chunk_size

        chunk_key = (work.device, chunk_size, tuple(numels), tuple(b.indices for b in buckets))
        if chunk_key != self._chunk_key:
            self.chunks = []
            for bucket in buckets:
                counts = torch.tensor([-(-numels[i] // chunk_size) for i in bucket.indices], dtype=torch.int64)
                rows = torch.repeat_interleave(torch.tensor(bucket.indices, dtype=torch.int64), counts)
                firsts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
                table = torch.stack([rows, torch.arange(rows.numel()) - firsts], dim=1)
                self.chunks.append(upload(table, torch.int64, work.device))
            self._chunk_key = chunk_key
            self.num_chunks = sum(c.shape[0] for c in self.chunks)


class TableBackend(ABC):
    """The backend protocol (``sum_squares`` -> ``finalize`` -> ``update``) over `DeviceTables`.

    Subclasses name themselves (``name``, for error messages), give the chunk size and launch their kernels:
    ``_sum_squares`` and ``_update`` once per bucket, ``_finalize`` once per step.
    """

    name: str

    def __init__(self) -> None:
        self.tables = DeviceTables(self.name)
        self._hyper = HyperTable(kernels.hyper_row)

    @abstractmethod
    def chunk_size(self) -> int: ...

    @abstractmethod
    def _sum_squares(self, tables: DeviceTables, chunks: Tensor, partials: Tensor, key: BucketKey,
                     aligned: bool) -> None: ...

    @abstractmethod
    def _finalize(self, squares: Tensor, tables: DeviceTables, norm: Tensor, skipped: Tensor) -> None: ...

    @abstractmethod
    def _update(self, tables: DeviceTables, chunks: Tensor, hyper: Tensor, norm: Tensor, key: BucketKey,
                aligned: bool, seed: int) -> None: ...

    def sum_squares(self, work: StepTensors, buckets: list[Bucket]) -> tuple[Tensor, list[tuple[int, int]]]:
        if not work.single_device:
            raise BackendUnavailable(f"the {self.name} FusedAdamW backend needs all parameters on one device")
        tables = self.tables
        tables.refresh(work, buckets, self.chunk_size())
        partials = torch.empty(tables.num_chunks, dtype=torch.float32, device=work.device)
        slices, begin = [], 0
        for bucket, chunks, aligned in zip(buckets, tables.chunks, tables.aligned, strict=True):
            end = begin + chunks.shape[0]
            self._sum_squares(tables, chunks, partials[begin:end], bucket.key, aligned)
            slices.append((begin, end))
            begin = end
        return partials, slices

    def finalize(self, work: StepTensors, squares: Tensor, skipped: Tensor) -> Tensor:
        norm = torch.empty((), dtype=torch.float32, device=work.device)
        self._finalize(squares, self.tables, norm, skipped)
        return norm

    def update(self, work: StepTensors, buckets: list[Bucket], param_groups: list[dict[str, Any]], norm: Tensor,
               seed: int) -> None:
        tables = self.tables
        hyper = self._hyper.get(param_groups, work.device)
        for bucket, chunks, aligned in zip(buckets, tables.chunks, tables.aligned, strict=True):
            self._update(tables, chunks, hyper, norm, bucket.key, aligned, seed)
