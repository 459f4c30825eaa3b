"""The CUDA-extension FusedAdamW backend (csrc/adamw.cu): apex-style multi-tensor apply.

Tensor pointers travel in fixed-size tables inside the kernel arguments (no device table to upload); a launch
takes as many tensors as fit under the 4 KB kernel-argument limit, so a step is a few launches per bucket.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lamelm_fast.kernels.adamw import hyper_row
from lamelm_fast.ops.dispatch import BackendUnavailable, cuda_extension
from lamelm_fast.optim._adamw_work import Bucket, HyperTable, StepTensors

CHUNK_SIZE = 16384  # elements per thread block (the .cu takes it as an argument; a multiple of 4)


class CudaAdamW:
    def __init__(self) -> None:
        self._hyper = HyperTable(hyper_row)

    @staticmethod
    def _stream(work: StepTensors) -> int:
        if not work.single_device:
            raise BackendUnavailable("the CUDA FusedAdamW backend needs all parameters on one device")
        return torch.cuda.current_stream(work.device).cuda_stream

    def sum_squares(self, work: StepTensors, buckets: list[Bucket]) -> tuple[Tensor, list[tuple[int, int]]]:
        stream = self._stream(work)
        counts = [sum(-(-work.grads[i].numel() // CHUNK_SIZE) for i in b.indices) for b in buckets]
        partials = torch.empty(sum(counts), dtype=torch.float32, device=work.device)
        slices, begin = [], 0
        with torch.cuda.device(work.device):
            for bucket, count in zip(buckets, counts, strict=True):
                cuda_extension().adamw_sum_squares([work.grads[i] for i in bucket.indices],
                                                   partials[begin:begin + count], CHUNK_SIZE, stream)
                slices.append((begin, begin + count))
                begin += count
        return partials, slices

    def finalize(self, work: StepTensors, squares: Tensor, skipped: Tensor) -> Tensor:
        norm = torch.empty((), dtype=torch.float32, device=work.device)
        with torch.cuda.device(work.device):
            cuda_extension().adamw_finalize(squares.contiguous(), norm, skipped, work.steps, self._stream(work))
        return norm

    def update(self, work: StepTensors, buckets: list[Bucket], param_groups: list[dict[str, Any]], norm: Tensor,
               seed: int) -> None:
        stream = self._stream(work)
        hyper = self._hyper.get(param_groups, work.device)
        with torch.cuda.device(work.device):
            for bucket in buckets:
                idx = bucket.indices
                masters = [work.masters[i] for i in idx] if bucket.key.master else []
                cuda_extension().adamw_update(
                    [work.params[i] for i in idx], [work.grads[i] for i in idx], [work.exp_avgs[i] for i in idx],
                    [work.exp_avg_sqs[i] for i in idx], masters, [work.steps[i] for i in idx],
                    [work.groups[i] for i in idx], [work.param_ids[i] for i in idx], hyper, norm,
                    bucket.key.stochastic, seed, CHUNK_SIZE, stream)
