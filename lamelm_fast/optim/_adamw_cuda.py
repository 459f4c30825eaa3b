"""The CUDA-extension FusedAdamW backend (csrc/adamw.cu) over the shared device tables (_adamw_tables.py).

The kernels read the same tensor, gradient-pointer and chunk tables as the Triton kernels, so a step is one
sum-of-squares and one update launch per bucket plus one finalize (3 for a single bucket), whatever the number of
tensors; the tables are built and uploaded by the same code, only when they change.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lamelm_fast.ops.dispatch import BackendUnavailable, cuda_extension
from lamelm_fast.optim._adamw_tables import DeviceTables, TableBackend
from lamelm_fast.optim._adamw_work import BucketKey

CHUNK_SIZE = 16384  # elements per thread block (the .cu takes it as an argument; a multiple of 4)
# dtype codes of csrc/adamw.h (LAMELM_FLOAT32...)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class CudaAdamW(TableBackend):
    name = "CUDA"

    def __init__(self) -> None:
        super().__init__()
        self._ext = cuda_extension()
        if self._ext is None:
            raise BackendUnavailable("the CUDA FusedAdamW backend needs the compiled extension lamelm_fast._C")

    def chunk_size(self) -> int:
        return CHUNK_SIZE

    @staticmethod
    def _stream(device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def _sum_squares(self, tables: DeviceTables, chunks: Tensor, partials: Tensor, key: BucketKey,
                     aligned: bool) -> None:
        self._ext.adamw_sum_squares(tables.meta, tables.grads, chunks, partials, DTYPE_CODES[key.grad_dtype], aligned,
                                    CHUNK_SIZE, self._stream(partials.device))

    def _finalize(self, squares: Tensor, tables: DeviceTables, norm: Tensor, skipped: Tensor) -> None:
        self._ext.adamw_finalize(squares.contiguous(), tables.meta, norm, skipped, self._stream(norm.device))

    def _update(self, tables: DeviceTables, chunks: Tensor, hyper: Tensor, norm: Tensor, key: BucketKey,
                aligned: bool, seed: int) -> None:
        self._ext.adamw_update(tables.meta, tables.grads, chunks, hyper, norm, DTYPE_CODES[key.param_dtype],
                               DTYPE_CODES[key.grad_dtype], key.master, key.stochastic, aligned, seed, CHUNK_SIZE,
                               self._stream(norm.device))
