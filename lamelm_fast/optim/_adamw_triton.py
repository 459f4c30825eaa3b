"""The Triton FusedAdamW backend: launches kernels/adamw.py over the shared device tables (_adamw_tables.py).

Launches per step: one sum-of-squares and one update launch per bucket (usually a single bucket) plus one
finalize, whatever the number of tensors. The tables are uploaded only when they change: the gradient pointers
when a gradient moved, the tensor and chunk tables when params, state or shapes changed.
"""

from __future__ import annotations

from torch import Tensor

from lamelm_fast.kernels import adamw as kernels
from lamelm_fast.ops.dispatch import triton_interpreted
from lamelm_fast.optim._adamw_tables import DeviceTables, TableBackend
from lamelm_fast.optim._adamw_work import BucketKey

# (chunk elements per program, elements per loop iteration, warps). The interpreter runs tiny chunks so that
# small test tensors span several chunks and blocks; GPU values are a first guess, to be tuned (bench/NOTES-adamw.md).
_GPU_CONFIG = (16384, 1024, 4)
_INTERPRETER_CONFIG = (128, 32, 1)


class TritonAdamW(TableBackend):
    name = "Triton"

    @staticmethod
    def _config() -> tuple[int, int, int]:
        return _INTERPRETER_CONFIG if triton_interpreted() else _GPU_CONFIG

    def chunk_size(self) -> int:
        return self._config()[0]

    def _sum_squares(self, tables: DeviceTables, chunks: Tensor, partials: Tensor, key: BucketKey,
                     aligned: bool) -> None:
        chunk_size, block, num_warps = self._config()
        kernels.sum_squares(tables.meta, tables.grads, chunks, partials, grad_dtype=key.grad_dtype, aligned=aligned,
                            chunk_size=chunk_size, block=block, num_warps=num_warps)

    def _finalize(self, squares: Tensor, tables: DeviceTables, norm: Tensor, skipped: Tensor) -> None:
        kernels.finalize(squares, tables.meta, norm, skipped)

    def _update(self, tables: DeviceTables, chunks: Tensor, hyper: Tensor, norm: Tensor, key: BucketKey,
                aligned: bool, seed: int) -> None:
        chunk_size, block, num_warps = self._config()
        kernels.adamw_update(tables.meta, tables.grads, chunks, hyper, norm, param_dtype=key.param_dtype,
                             grad_dtype=key.grad_dtype, master=key.master, stochastic=key.stochastic, seed=seed,
                             aligned=aligned, chunk_size=chunk_size, block=block, num_warps=num_warps)
