"""The Triton FusedAdamW backend: builds the device tensor/chunk tables and launches kernels/adamw.py.

Launches per step: one sum-of-squares and one update launch per bucket (usually a single bucket) plus one
finalize, whatever the number of tensors. The tables are uploaded only when they change: the chunk table when
shapes change, the tensor table when a data pointer changes (grads re-allocated at a new address, state loaded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lamelm_fast.kernels import adamw as kernels
from lamelm_fast.ops.dispatch import BackendUnavailable, triton_interpreted
from lamelm_fast.optim._adamw_work import Bucket, HyperTable, StepTensors, upload

# (chunk elements per program, elements per loop iteration, warps). The interpreter runs tiny chunks so that
# small test tensors span several chunks and blocks; GPU values are a first guess, to be tuned (bench/NOTES-adamw.md).
_GPU_CONFIG = (16384, 1024, 4)
_INTERPRETER_CONFIG = (128, 32, 1)


class TritonAdamW:
    def __init__(self) -> None:
        self._rows: list[tuple[int, ...]] | None = None
        self._meta: Tensor | None = None
        self._chunk_key: tuple | None = None
        self._chunks: list[Tensor] = []  # per bucket: [n, 2] (table row, chunk index)
        self._bucket_aligned: list[bool] = []
        self._hyper = HyperTable(kernels.hyper_row)

    @staticmethod
    def _config() -> tuple[int, int, int]:
        return _INTERPRETER_CONFIG if triton_interpreted() else _GPU_CONFIG

    def _tables(self, work: StepTensors, buckets: list[Bucket]) -> None:
        if not work.single_device:
            raise BackendUnavailable("the Triton FusedAdamW backend needs all parameters on one device")
        chunk_size = self._config()[0]
        rows, misaligned, numels = [], [], []
        meta_row = kernels.meta_row
        # Every step (grads are re-allocated, params can be re-assigned): keep the per-tensor work small. State and
        # master copy follow the param's layout by construction and _collect gave the grad that layout too.
        for i, param in enumerate(work.params):
            grad, master = work.grads[i], work.masters[i]
            if not param.is_contiguous():
                raise BackendUnavailable("the Triton FusedAdamW backend needs contiguous parameters")
            pointers = (param.data_ptr(), grad.data_ptr(), work.exp_avgs[i].data_ptr(),
                        work.exp_avg_sqs[i].data_ptr(), 0 if master is None else master.data_ptr())
            misaligned.append((pointers[0] | pointers[1] | pointers[2] | pointers[3] | pointers[4]) % 16)
            numels.append(param.numel())
            rows.append(meta_row(*pointers, work.steps[i].data_ptr(), numels[-1], work.groups[i], work.param_ids[i]))
        if rows != self._rows or self._meta is None or self._meta.device != work.device:
            self._meta, self._rows = upload(rows, torch.int64, work.device), rows
        self._bucket_aligned = [not any(misaligned[i] for i in b.indices) for b in buckets]

        chunk_key = (work.device, chunk_size, tuple(numels), tuple(b.indices for b in buckets))
        if chunk_key != self._chunk_key:
            self._chunks = []
            for bucket in buckets:
                counts = torch.tensor([-(-numels[i] // chunk_size) for i in bucket.indices], dtype=torch.int64)
                rows_of = torch.repeat_interleave(torch.tensor(bucket.indices, dtype=torch.int64), counts)
                firsts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
                table = torch.stack([rows_of, torch.arange(rows_of.numel()) - firsts], dim=1)
                self._chunks.append(upload(table, torch.int64, work.device))
            self._chunk_key = chunk_key

    def sum_squares(self, work: StepTensors, buckets: list[Bucket]) -> tuple[Tensor, list[tuple[int, int]]]:
        self._tables(work, buckets)
        chunk_size, block, num_warps = self._config()
        partials = torch.empty(sum(c.shape[0] for c in self._chunks), dtype=torch.float32, device=work.device)
        slices, begin = [], 0
        for bucket, chunks, aligned in zip(buckets, self._chunks, self._bucket_aligned, strict=True):
            end = begin + chunks.shape[0]
            kernels.sum_squares(self._meta, chunks, partials[begin:end], grad_dtype=bucket.key.grad_dtype,
                                aligned=aligned, chunk_size=chunk_size, block=block, num_warps=num_warps)
            slices.append((begin, end))
            begin = end
        return partials, slices

    def finalize(self, work: StepTensors, squares: Tensor, skipped: Tensor) -> Tensor:
        norm = torch.empty((), dtype=torch.float32, device=work.device)
        kernels.finalize(squares, self._meta, norm, skipped)
        return norm

    def update(self, work: StepTensors, buckets: list[Bucket], param_groups: list[dict[str, Any]], norm: Tensor,
               seed: int) -> None:
        chunk_size, block, num_warps = self._config()
        hyper = self._hyper.get(param_groups, work.device)
        for bucket, chunks, aligned in zip(buckets, self._chunks, self._bucket_aligned, strict=True):
            key = bucket.key
            kernels.adamw_update(self._meta, chunks, hyper, norm, param_dtype=key.param_dtype,
                                 grad_dtype=key.grad_dtype, master=key.master, stochastic=key.stochastic, seed=seed,
                                 aligned=aligned, chunk_size=chunk_size, block=block, num_warps=num_warps)
