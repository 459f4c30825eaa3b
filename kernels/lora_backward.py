"""The two LoRA adapter products of a projection's backward that read the output gradient, in one pass over it.

With ``dy`` the output gradient [M, N] (N = out features), ``B`` [N, r] and ``xa = dropout(x) @ A^T`` [M, r] saved by
the forward, the backward needs ``gb = dy @ B`` [M, r] (for dA and the input gradient) and ``dy^T @ xa`` [N, r] (for
dB), both with dy rounded to the adapter dtype. Torch reads dy three times for them (the cast to the adapter dtype
reads it and writes a copy, each matmul reads the copy): 10 bytes per dy element for fp32 dy and a 16-bit adapter.
Here dy is read once (4 bytes), cast to the adapter dtype in registers (the rounding of ``dy.to(adapter dtype)``), and
both products are taken from the same tile with ``tl.dot`` (fp32 accumulation; IEEE fp32 for an fp32 adapter).

Work split. The grid is ``(row programs, column groups)``: a program owns a column group (``group_n`` columns of dy)
and a contiguous run of ``BLOCK_M``-row blocks. For each row block it loops over its columns in ``BLOCK_N`` chunks,
keeping the block's ``gb`` [BLOCK_M, r] in registers and adding ``dy_chunk^T @ xa_block`` into its own fp32 slice
[group_n, r] of a [row programs, N, r] buffer (read-modify-write; the slice, ~group_n * r * 4 bytes, stays in L2).
Both sums across programs are then finished by torch in a fixed order (``partial.sum(0)``): deterministic, unlike
fp32 atomics, with no zero fill (a program's first row block writes its slice without reading it) and no contention;
the RMSNorm weight gradient (``kernels/rms_norm.py``) does the same. The partials cost ``2 * 4 * r`` bytes per row
of dy per column group (gb) plus per column per row program (dy^T xa); :func:`_plan` picks the number of column
groups that minimises their sum for a fixed number of programs (one per SM: the loop over columns is pipelined, so
one program keeps enough loads in flight). With one column group gb is written directly in the adapter dtype.

Ranks up to :data:`MAX_RANK`; the rank is padded to a power of two >= 16 (``tl.dot``'s minimum) with masks, so
r = 8 or 24 work too. Row offsets are int64. dy may have any row stride (unit column stride); B and xa any strides.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lamelm_fast.kernels._grid import cdiv, next_power_of_2, persistent_programs
from lamelm_fast.ops.dispatch import triton_interpreted

__all__ = ["MAX_RANK", "lora_output_grad"]

MAX_RANK = 128  # gb [BLOCK_M, r] and a [BLOCK_N, r] slice in registers next to the dy tile
_GPU_TILES = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
_INTERPRETER_TILES = {"BLOCK_M": 32, "BLOCK_N": 32}  # small: several row blocks and chunks on the tests' shapes
_PROGRAMS_PER_SM = 1
_INTERPRETER_PROGRAMS = 4  # the interpreter or a compile-only run: a few programs, each looping over row blocks


@triton.jit
def _lora_output_grad_kernel(
    dy_ptr, stride_dym,  # [M, N], unit column stride, any float dtype
    b_ptr, stride_bn, stride_br,  # [N, rank], any float dtype
    xa_ptr, stride_xm, stride_xr,  # [M, rank] in the adapter dtype: its dtype is the one dy is rounded to
    gb_ptr,  # [M, rank] adapter dtype out, or [groups, M, rank] fp32 partials out when GB_PARTIAL
    db_ptr,  # [row programs, N, rank] fp32 partials of scale * dy^T @ xa out
    M, N, rank, group_n, tiles_per_program, scale,
    GB_PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    compute = xa_ptr.dtype.element_ty
    r = tl.arange(0, RANK_PAD)
    r_ok = r < rank
    col_start = group * group_n
    col_end = tl.minimum(col_start + group_n, N)
    for i in range(0, tiles_per_program):
        rows = (program * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride > 2^31
        row_ok = rows < M  # rows past the end load as zeros and add nothing
        xa = tl.load(xa_ptr + rows[:, None] * stride_xm + r[None, :] * stride_xr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        gb = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
        factor = tl.where(i == tiles_per_program - 1, scale, 1.0)  # a program's last row block finishes its slice
        for col0 in range(col_start, col_end, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            col_ok = cols < col_end
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(compute)
            b = tl.load(b_ptr + cols[:, None] * stride_bn + r[None, :] * stride_br,
                        mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(compute)
            gb = tl.dot(dy, b, gb, input_precision=PRECISION)
            slice_ptr = db_ptr + (program * N + cols)[:, None] * rank + r[None, :]
            slice_mask = col_ok[:, None] & r_ok[None, :]
            db = tl.load(slice_ptr, mask=slice_mask & (i > 0), other=0.0)  # the first row block starts the slice
            db = tl.dot(tl.trans(dy), xa, db, input_precision=PRECISION)
            tl.store(slice_ptr, db * factor, mask=slice_mask)
        # The next row block re-reads the slice that other threads of this program just wrote.
        tl.debug_barrier()
        gb_mask = row_ok[:, None] & r_ok[None, :]
        if GB_PARTIAL:
            tl.store(gb_ptr + (group.to(tl.int64) * M + rows)[:, None] * rank + r[None, :], gb, mask=gb_mask)
        else:
            tl.store(gb_ptr + rows[:, None] * rank + r[None, :], gb.to(gb_ptr.dtype.element_ty), mask=gb_mask)


def _plan(M: int, N: int, block_m: int, block_n: int, programs: int,
          groups: int | None) -> tuple[int, int, int, int]:
    """(column groups, group width, row programs, row blocks per program) for at most ~``programs`` programs.

    Partials cost ~``groups * M + (programs / groups) * N`` fp32 rows of r (gb per column group, dy^T xa per row
    program), least at ``groups = sqrt(programs * N / M)``."""
    chunks, tiles = cdiv(N, block_n), cdiv(M, block_m)
    if groups is None:
        groups = round(math.sqrt(programs * N / M))
    groups = max(1, min(groups, chunks, programs))
    group_n = cdiv(chunks, groups) * block_n
    groups = cdiv(N, group_n)
    row_programs = max(1, min(tiles, programs // groups))
    tiles_per_program = cdiv(tiles, row_programs)
    return groups, group_n, cdiv(tiles, tiles_per_program), tiles_per_program


def lora_output_grad(grad: torch.Tensor, B: torch.Tensor, xa: torch.Tensor, *, lora_dtype: torch.dtype,
                     scale: float = 1.0, programs: int | None = None,
                     groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gb, db)``: ``gb = g @ B`` [M, r] in ``lora_dtype`` and ``db = scale * g^T @ xa`` [N, r] in fp32 (not
    rounded further: dB for an fp32 adapter as it is), with ``g = grad.to(lora_dtype)``, from one read of ``grad``
    [M, N]. The scale is applied to each program's partial sum, so dB costs no launch of its own.

    ``grad``: any float dtype, unit column stride (any row stride). ``B`` [N, r]: any float dtype and strides, cast
    to ``lora_dtype`` in registers. ``xa`` [M, r]: cast to ``lora_dtype`` first if it is not in it. ``r`` <=
    :data:`MAX_RANK`. ``programs`` / ``groups``: override the grid (tests, benchmarks); by default one program per
    SM (a few under the interpreter), split into column groups by :func:`_plan`.
    """
    M, N = grad.shape
    rank = B.shape[1]
    if tuple(B.shape) != (N, rank) or tuple(xa.shape) != (M, rank):
        raise ValueError(f"grad {list(grad.shape)}, B {list(B.shape)} and xa {list(xa.shape)} do not fit "
                         "[M, N] @ [N, r] and [M, r]")
    if not 0 < rank <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}, got {rank}")
    if M > 1 and N > 1 and grad.stride(1) != 1:
        raise ValueError(f"grad needs unit column stride, got strides {grad.stride()}")
    xa = xa.to(lora_dtype)
    if M == 0 or N == 0:
        return (torch.zeros(M, rank, dtype=lora_dtype, device=grad.device),
                torch.zeros(N, rank, dtype=torch.float32, device=grad.device))
    tiles = dict(_INTERPRETER_TILES if triton_interpreted() else _GPU_TILES)
    programs = programs or persistent_programs(grad.device, _PROGRAMS_PER_SM, elsewhere=_INTERPRETER_PROGRAMS)
    n_groups, group_n, row_programs, tiles_per_program = _plan(M, N, tiles["BLOCK_M"], tiles["BLOCK_N"], programs,
                                                               groups)
    gb_partial = n_groups > 1
    gb = torch.empty((n_groups, M, rank) if gb_partial else (M, rank),
                     dtype=torch.float32 if gb_partial else lora_dtype, device=grad.device)
    db = torch.empty(row_programs, N, rank, dtype=torch.float32, device=grad.device)
    _lora_output_grad_kernel[(row_programs, n_groups)](
        grad, grad.stride(0), B, B.stride(0), B.stride(1), xa, xa.stride(0), xa.stride(1), gb, db,
        M, N, rank, group_n, tiles_per_program, float(scale),
        GB_PARTIAL=gb_partial, PRECISION="ieee" if lora_dtype == torch.float32 else "tf32",
        RANK_PAD=max(16, next_power_of_2(rank)), **tiles,
    )
    if gb_partial:
        gb = gb.sum(0).to(lora_dtype)
    return gb, db.sum(0)
