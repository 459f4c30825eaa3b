"""4-bit (NF4 / FP4, bitsandbytes storage) dequantization and the LoRA matmul that reads the 4-bit weight directly.

``w`` below is a :class:`lamelm_fast.ops.quant4bit.Packed4bit` (read for its tensors and sizes only): the ``[R, C]``
weight flattened row-major, two codes per byte with the first value in the HIGH nibble, one scale per ``blocksize``
flat values (fp32, or uint8 codes into a 256-entry table times a nested fp32 absmax, plus an offset).

- :func:`dequantize_4bit`: the whole weight into a tensor, bit for bit what bitsandbytes returns.
- :func:`matmul_4bit_lora`: ``out (+)= a @ W^T + scale * left @ right (+ bias)`` (``a @ W`` with
  ``weight_transposed=False``): 4-bit tiles are dequantized in registers and fed to ``tl.dot``; the LoRA product
  is added in the epilogue. The forward is ``x @ W^T + s (x A^T) B^T``, the input gradient
  ``dy @ W + s (dy B) A``. Tiny row counts (decoding) take a GEMV kernel without ``tl.dot``.
- :func:`dequant_matmul_4bit_lora`: the same sum as :func:`dequantize_4bit` into a transient weight buffer, then
  one cuBLAS GEMM that also carries the LoRA term and the bias (appended to its reduction, or through its
  ``beta = 1`` input), for large row counts where cuBLAS outruns the in-register dequantization
  (``lamelm_fast.ops.nf4_matmul`` chooses). :func:`dequant_matmul_4bit_lora_sum`: the input gradient of several
  projections of one input (q/k/v) the same way, in one GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from lamelm_fast.kernels._grid import cdiv, next_power_of_2
from lamelm_fast.ops.dispatch import triton_interpreted

__all__ = ["GEMV_MAX_ROWS", "dequant_matmul_4bit_lora", "dequant_matmul_4bit_lora_sum", "dequantize_4bit",
           "lora_placement", "matmul_4bit_lora"]

GEMV_MAX_ROWS = 4  # up to this many rows the weight is streamed once per row, without tensor cores
# torch.mm(..., out_dtype=float32) on half operands (CUDA, recent torch): the dequant path's fp32 results in one write.
_MM_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()


@triton.jit
def _block_scale(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the given (int64) block indices; double-quantized: code * nested absmax, then + offset."""
    if NESTED:
        code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(code2_ptr + code) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr,
                  rows, col0, n_rows, n_cols,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                  NESTED: tl.constexpr, EVEN_COLS: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    """fp32 ``W[rows, col0 : col0 + BLOCK_C]``. Entries outside W are finite garbage: callers mask the other
    operand of the product, or the store. ``col0`` is a multiple of ``BLOCK_C`` (a power of two)."""
    cols = col0 + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    row_start = rows.to(tl.int64) * n_cols  # flat index of each row's first value; can pass 2^31
    if EVEN_COLS:
        # Every row starts on a byte boundary: BLOCK_C // 2 consecutive bytes per row, split into two nibbles.
        byte_cols = col0 // 2 + tl.arange(0, BLOCK_C // 2)
        byte = tl.load(w_ptr + (row_start // 2)[:, None] + byte_cols[None, :],
                       mask=row_ok[:, None] & (byte_cols < n_cols // 2)[None, :], other=0)
        codes = tl.interleave(byte >> 4, byte & 15)
    else:
        flat = row_start[:, None] + cols[None, :]
        byte = tl.load(w_ptr + flat // 2, mask=mask, other=0)
        codes = (byte.to(tl.int32) >> (4 - 4 * (flat % 2)).to(tl.int32)) & 15  # even flat index: high nibble
    values = tl.load(table_ptr + codes.to(tl.int32))
    if ROW_BLOCKS:
        # Blocks never straddle rows (n_cols % BLOCKSIZE == 0): one scale per row, or per row and sub-block.
        first_block = (row_start // BLOCKSIZE) + col0 // BLOCKSIZE
        if BLOCK_C <= BLOCKSIZE:
            values = values * _block_scale(first_block, row_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                           NESTED, NESTED_BLOCKSIZE)[:, None]
        else:
            sub = tl.arange(0, BLOCK_C // BLOCKSIZE)
            block = first_block[:, None] + sub[None, :]
            sub_ok = row_ok[:, None] & (col0 + sub * BLOCKSIZE < n_cols)[None, :]
            scale = _block_scale(block, sub_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                 NESTED, NESTED_BLOCKSIZE)
            values = tl.reshape(values, (BLOCK_R, BLOCK_C // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None]
            values = tl.reshape(values, (BLOCK_R, BLOCK_C))
    else:
        block = (row_start[:, None] + cols[None, :]) // BLOCKSIZE
        values = values * _block_scale(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                       NESTED, NESTED_BLOCKSIZE)
    return values


@triton.jit
def _dequantize_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, out_ptr,
                       n_rows, n_cols, stride_out,
                       extra_ptr, extra_rows, extra_cols, stride_er, stride_ec, extra_row0, extra_col0, extra_scale,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_COLS: tl.constexpr,
                       ROW_BLOCKS: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """W into out's top-left corner; with HAS_EXTRA, the programs past W's row tiles write ``extra_scale * extra``
    at (extra_row0, extra_col0), tile by tile (the scaled LoRA rows of a concatenated GEMM operand: no launch of
    their own)."""
    row_tiles = tl.cdiv(n_rows, BLOCK_R)
    if HAS_EXTRA:
        is_extra = tl.program_id(0) >= row_tiles
    else:
        is_extra = False
    if is_extra:
        tile = (tl.program_id(0) - row_tiles) * tl.num_programs(1) + tl.program_id(1)
        tiles_c = tl.cdiv(extra_cols, BLOCK_C)
        rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)  # tiles past the block: rows past its end, masked
        cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < extra_rows)[:, None] & (cols < extra_cols)[None, :]
        values = tl.load(extra_ptr + rows.to(tl.int64)[:, None] * stride_er + cols[None, :] * stride_ec, mask=mask,
                         other=0.0).to(tl.float32) * extra_scale
        tl.store(out_ptr + (extra_row0 + rows).to(tl.int64)[:, None] * stride_out + (extra_col0 + cols)[None, :],
                 values.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        col0 = tl.program_id(1) * BLOCK_C
        values = _dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, rows, col0,
                               n_rows, n_cols, BLOCK_R, BLOCK_C, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, EVEN_COLS,
                               ROW_BLOCKS)
        cols = col0 + tl.arange(0, BLOCK_C)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
                 values.to(out_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _lora_epilogue(acc, left_ptr, right_ptr, rows, cols, row_ok, col_ok, rank, scale,
                   stride_lm, stride_lr, stride_rr, stride_rp, RANK_PAD: tl.constexpr,
                   LORA_PRECISION: tl.constexpr):
    """``acc + scale * left[rows, :rank] @ right[:rank, cols]`` with ``tl.dot`` (RANK_PAD >= 16)."""
    r = tl.arange(0, RANK_PAD)
    r_ok = r < rank
    left = tl.load(left_ptr + rows.to(tl.int64)[:, None] * stride_lm + r[None, :] * stride_lr,
                   mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    right = tl.load(right_ptr + r[:, None] * stride_rr + cols.to(tl.int64)[None, :] * stride_rp,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    return acc + scale * tl.dot(left, right, input_precision=LORA_PRECISION)


@triton.jit
def _matmul_kernel(a_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr,
                   left_ptr, right_ptr, bias_ptr, out_ptr,
                   M, P, Q, w_cols, rank, scale, m_bucket,
                   stride_am, stride_aq, stride_om, stride_op, stride_lm, stride_lr, stride_rr, stride_rp,
                   BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   EVEN_COLS: tl.constexpr, ROW_BLOCKS: tl.constexpr, WEIGHT_TRANSPOSED: tl.constexpr,
                   HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                   RANK_PAD: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, P] (+)= a[M, Q] @ op(W) + scale * left @ right + bias; op(W) = W^T of a [P, Q] weight
    (WEIGHT_TRANSPOSED, the forward) or W of a [Q, P] weight (the input gradient). m_bucket: autotune key only."""
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is hot in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_p = tl.cdiv(P, BLOCK_P)
    group = pid // (GROUP_M * tiles_p)
    first_m = group * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_p = (pid % (GROUP_M * tiles_p)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < M
    col_ok = cols < P
    k = tl.arange(0, BLOCK_Q)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        a = tl.load(a_rows + (q0 + k)[None, :] * stride_aq, mask=row_ok[:, None] & (q0 + k < Q)[None, :], other=0.0)
        if WEIGHT_TRANSPOSED:
            w = _dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, cols, q0, P,
                              w_cols, BLOCK_P, BLOCK_Q, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, EVEN_COLS, ROW_BLOCKS)
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=PRECISION)
        else:
            w = _dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, q0 + k,
                              pid_p * BLOCK_P, Q, w_cols, BLOCK_Q, BLOCK_P, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED,
                              EVEN_COLS, ROW_BLOCKS)
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    if HAS_LORA:
        acc = _lora_epilogue(acc, left_ptr, right_ptr, rows, cols, row_ok, col_ok, rank, scale,
                             stride_lm, stride_lr, stride_rr, stride_rp, RANK_PAD, LORA_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_op
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(a_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr,
                 left_ptr, right_ptr, bias_ptr, out_ptr,
                 P, Q, w_cols, rank, scale,
                 stride_am, stride_aq, stride_om, stride_op, stride_lm, stride_lr, stride_rr, stride_rp,
                 BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                 EVEN_COLS: tl.constexpr, ROW_BLOCKS: tl.constexpr, WEIGHT_TRANSPOSED: tl.constexpr,
                 HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                 RANK_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """One row of ``a`` per program (axis 1): the same sum as _matmul_kernel with fp32 multiply-adds; the weight
    is still rounded to a's dtype first, as the matmul path does."""
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    col_ok = cols < P
    k = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        a = tl.load(a_ptr + row * stride_am + (q0 + k) * stride_aq, mask=q0 + k < Q, other=0.0)
        if WEIGHT_TRANSPOSED:
            w = _dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, cols, q0, P,
                              w_cols, BLOCK_P, BLOCK_Q, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, EVEN_COLS, ROW_BLOCKS)
            acc += tl.sum(w.to(a.dtype).to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
        else:
            w = _dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, q0 + k,
                              tl.program_id(0) * BLOCK_P, Q, w_cols, BLOCK_Q, BLOCK_P, BLOCKSIZE, NESTED_BLOCKSIZE,
                              NESTED, EVEN_COLS, ROW_BLOCKS)
            acc += tl.sum(w.to(a.dtype).to(tl.float32) * a.to(tl.float32)[:, None], axis=0)
    if HAS_LORA:
        r = tl.arange(0, RANK_PAD)
        left = tl.load(left_ptr + row * stride_lm + r * stride_lr, mask=r < rank, other=0.0).to(tl.float32)
        right = tl.load(right_ptr + r[:, None] * stride_rr + cols.to(tl.int64)[None, :] * stride_rp,
                        mask=(r < rank)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += scale * tl.sum(left[:, None] * right, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + row * stride_om + cols * stride_op
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _gpu_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_P, BLOCK_Q, warps, stages): wide tiles amortise the per-tile dequantization over BLOCK_M rows.
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
              (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_P": p, "BLOCK_Q": q, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, p, q, w, s in shapes]


_matmul_tuned = triton.autotune(
    configs=_gpu_configs(),
    key=["m_bucket", "P", "Q", "WEIGHT_TRANSPOSED", "HAS_LORA", "BLOCKSIZE", "NESTED"],
    restore_value=["out_ptr"],  # ACCUMULATE adds into out: every timing run must start from the same values
)(_matmul_kernel)
# Under the interpreter: few, small tiles (it is slow per program), column tiles of 64 and 32 so that blocksize 32
# exercises the several-scales-per-row branch of _dequant_tile and larger blocksizes the one-scale branch.
_INTERPRETER_TILES = {"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_Q": 64, "GROUP_M": 4}
_GEMV_TILES = {"BLOCK_P": 32, "BLOCK_Q": 64} if triton_interpreted() else {"BLOCK_P": 64, "BLOCK_Q": 128}


def _weight_args(w: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Pointer arguments and layout switches of a Packed4bit (unused nested pointers alias absmax)."""
    nested = w.nested
    ptrs = (w.data, w.absmax, w.nested_absmax if nested else w.absmax, w.nested_code if nested else w.absmax,
            w.nested_offset if nested else w.absmax, w.table)
    cols = w.shape[1]
    flags = {"BLOCKSIZE": w.blocksize, "NESTED_BLOCKSIZE": w.nested_blocksize if nested else 1, "NESTED": nested,
             "EVEN_COLS": cols % 2 == 0, "ROW_BLOCKS": cols % w.blocksize == 0}
    return ptrs, flags


def dequantize_4bit(w: Any, out: torch.Tensor, *, extra: torch.Tensor | None = None,
                    extra_at: tuple[int, int] = (0, 0), extra_scale: float = 1.0) -> torch.Tensor:
    """Write the ``[R, C]`` weight into ``out`` (its dtype): fp32 code value times fp32 block scale, rounded once.
    ``out``'s rows may be strided (a column slice of a wider buffer); its elements within a row are not.

    ``extra`` (any float dtype and strides): also write ``extra_scale * extra`` (fp32, rounded once) into ``out`` at
    row and column ``extra_at``, in the same launch. ``out`` is then the whole buffer, W in its top-left corner."""
    rows, cols = w.shape
    if extra is None:
        extent, fits = (rows, cols), tuple(out.shape) == (rows, cols)
    else:
        extent = (max(rows, extra_at[0] + extra.shape[0]), max(cols, extra_at[1] + extra.shape[1]))
        fits = out.dim() == 2 and out.shape[0] >= extent[0] and out.shape[1] >= extent[1]
    if not fits or (out.shape[1] > 1 and out.stride(1) != 1):
        need = (f"{list(extent)}" if extra is None else
                f"at least {list(extent)} (the weight, and the {list(extra.shape)} extra at {list(extra_at)})")
        raise ValueError(f"out must be {need} with unit column stride, got {list(out.shape)} strides {out.stride()}")
    ptrs, flags = _weight_args(w)
    block_r, block_c = (16, 64) if triton_interpreted() else (32, 128)
    grid_r, grid_c = cdiv(rows, block_r), cdiv(cols, block_c)
    extra_args = (out, 0, 0, 0, 0, 0, 0, 1.0)  # (unused without an extra)
    if extra is not None:
        extra_tiles = cdiv(extra.shape[0], block_r) * cdiv(extra.shape[1], block_c)
        grid_r += cdiv(extra_tiles, grid_c)
        extra_args = (extra, *extra.shape, *extra.stride(), *extra_at, float(extra_scale))
    # No fused multiply-add: the nested scale must be rounded after the multiply, as bitsandbytes rounds it.
    _dequantize_kernel[(grid_r, grid_c)](*ptrs, out, rows, cols, out.stride(0), *extra_args, BLOCK_R=block_r,
                                         BLOCK_C=block_c, **flags, HAS_EXTRA=extra is not None,
                                         enable_fp_fusion=False)
    return out


def _problem(a: torch.Tensor, w: Any, weight_transposed: bool, out: torch.Tensor | None,
             accumulate: bool) -> tuple[int, int, int]:
    """(M, P, Q) of ``a [M, Q] @ op(W) -> [M, P]``, after checking that the operands fit."""
    M, Q = a.shape
    P = w.shape[0] if weight_transposed else w.shape[1]
    if (w.shape[1] if weight_transposed else w.shape[0]) != Q:
        raise ValueError(f"a is [{M}, {Q}] but the 4-bit weight is {list(w.shape)}")
    if out is None and accumulate:
        raise ValueError("accumulate=True needs out")
    if out is not None and tuple(out.shape) != (M, P):
        raise ValueError(f"out is {list(out.shape)}, the product is [{M}, {P}]")
    return M, P, Q


def matmul_4bit_lora(a: torch.Tensor, w: Any, *, weight_transposed: bool = True,
                     lora: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float = 1.0,
                     bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     accumulate: bool = False) -> torch.Tensor:
    """``out (+)= a @ op(W) + scale * left @ right + bias`` for 2-D ``a`` [M, Q], in a's dtype unless ``out`` is given.

    ``weight_transposed``: op(W) = W^T (W is [P, Q], the forward), else W (W is [Q, P], the input gradient).
    ``lora = (left [M, r], right [r, P])``, any strides (pass ``B.t()`` as ``right`` in the forward); the
    epilogue multiplies them in their own dtype. ``accumulate`` adds into ``out`` instead of overwriting it.
    """
    M, P, Q = _problem(a, w, weight_transposed, out, accumulate)
    if out is None:
        out = torch.empty(M, P, dtype=a.dtype, device=a.device)
    ptrs, flags = _weight_args(w)
    left, right = lora if lora is not None else (a, a)  # unused when there is no LoRA term
    rank = left.shape[1] if lora is not None else 0
    args = (a, *ptrs, left, right, bias if bias is not None else a, out)
    strides = (*a.stride(), *out.stride(), *left.stride(), *right.stride())
    switches = {**flags, "WEIGHT_TRANSPOSED": weight_transposed, "HAS_LORA": lora is not None,
                "HAS_BIAS": bias is not None, "ACCUMULATE": accumulate}
    if M <= GEMV_MAX_ROWS:
        grid = (cdiv(P, _GEMV_TILES["BLOCK_P"]), M)
        _gemv_kernel[grid](*args, P, Q, w.shape[1], rank, scale, *strides, **switches,
                           RANK_PAD=next_power_of_2(max(rank, 1)), **_GEMV_TILES)
        return out
    # fp32 operands multiply in IEEE fp32, not TF32: the fp32 path is the exact one (CPU parity, tests).
    switches.update(RANK_PAD=max(16, next_power_of_2(rank)),
                    PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                    LORA_PRECISION="ieee" if left.dtype == torch.float32 and a.dtype == torch.float32 else "tf32")
    scalars = (M, P, Q, w.shape[1], rank, scale, next_power_of_2(M))
    if triton_interpreted():
        tiles = _INTERPRETER_TILES
        grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(P, tiles["BLOCK_P"]),)
        _matmul_kernel[grid](*args, *scalars, *strides, **switches, **tiles)
    else:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(P, meta["BLOCK_P"]),)
        _matmul_tuned[grid](*args, *scalars, *strides, **switches)
    return out


def _add_product(result: torch.Tensor, init: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor,
                 alpha: float = 1.0) -> None:
    """``result = init + alpha * left @ right`` in one cuBLAS call; ``init`` is ``result`` itself, a row vector
    (broadcast) or None (``beta = 0``: whatever ``result`` holds is ignored, NaN included)."""
    if init is None or init is result:
        result.addmm_(left, right, beta=0.0 if init is None else 1.0, alpha=alpha)
    else:
        torch.addmm(init, left, right, alpha=alpha, out=result)


def _concatenated(a: torch.Tensor, w: Any, weight_transposed: bool, lora: tuple[torch.Tensor, torch.Tensor] | None,
                  scale: float, bias: torch.Tensor | None, dtype: torch.dtype,
                  terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[a | left | 1 | 0]`` and ``[op(W); scale * right; bias; 0]`` in ``dtype``: the whole sum as one product
    whose reduction runs ``terms`` entries past a's columns (rounded up to keep 16-byte rows; zeros there)."""
    M, Q = a.shape
    P = w.shape[0] if weight_transposed else w.shape[1]
    width = cdiv(Q + terms, 8) * 8
    rank = 0 if lora is None else lora[0].shape[1]
    lhs = torch.empty(M, width, dtype=dtype, device=a.device)
    # One op writes a and the LoRA input side by side; a's cast to the compute dtype, which the other paths pay as a
    # pass of its own, lands here.
    torch.cat([a] if lora is None else [a, lora[0]], dim=1, out=lhs if width == Q + rank else lhs[:, :Q + rank])
    # Forward: W [P, Q] in the first Q columns of a [P, width] buffer (read transposed); input gradient: W [Q, P] in
    # the first Q rows of a [width, P] buffer. Either way rhs is the [width, P] operand.
    weight = torch.empty((P, width) if weight_transposed else (width, P), dtype=dtype, device=a.device)
    if lora is None:
        dequantize_4bit(w, weight[:, :Q] if weight_transposed else weight[:Q])
    else:  # the scaled LoRA right factor by the same launch, scaled in fp32 and rounded once
        dequantize_4bit(w, weight, extra=lora[1].t() if weight_transposed else lora[1],
                        extra_at=(0, Q) if weight_transposed else (Q, 0), extra_scale=scale)
    rhs = weight.t() if weight_transposed else weight
    if bias is not None:
        lhs[:, Q + rank] = 1
        rhs[Q + rank] = bias
    if width > Q + terms:  # both sides: garbage times zero can be NaN (no padding: no ops to launch)
        lhs[:, Q + terms:].zero_()
        rhs[Q + terms:].zero_()
    return lhs, rhs


def lora_placement(in_dtype: torch.dtype, dtype: torch.dtype, reduction: int, columns: int, terms: int) -> str:
    """Where :func:`dequant_matmul_4bit_lora` puts ``terms`` extra terms (LoRA rank, bias) by default: ``concat``
    when a is cast anyway or its rows (``reduction``) are shorter than the result's (``columns``): copying a costs
    4 bytes per a entry, the addmm passes 4 per result entry; ``addmm`` otherwise."""
    return "concat" if terms and (in_dtype != dtype or reduction < columns) else "addmm"


def _mm_writes_fp32(out: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether cuBLAS can write half-precision operands' product into the fp32 ``out`` itself (the trainer's QLoRA:
    fp32 results from bf16 compute): it rounds its fp32 accumulator straight into out, with no half-precision result
    and no conversion pass."""
    return out.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16) and out.is_cuda and _MM_OUT_DTYPE


def dequant_matmul_4bit_lora(a: torch.Tensor, w: Any, *, dtype: torch.dtype | None = None,
                             weight_transposed: bool = True, lora: tuple[torch.Tensor, torch.Tensor] | None = None,
                             scale: float = 1.0, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                             accumulate: bool = False, placement: str | None = None) -> torch.Tensor:
    """:func:`matmul_4bit_lora` (same arguments and result, up to rounding) as dequantize, then one cuBLAS GEMM.

    ``dtype``: the compute dtype (default a's; ``a`` is cast on the way into the GEMM's operand). The weight is
    dequantized into a buffer that lives for this call only (QLoRA exists to not hold bf16 weights). The LoRA term
    and the bias ride in the same GEMM, ``placement``:

    - ``"concat"``: appended to the reduction (``[a | left | 1] @ [op(W); scale * right; bias]``, r + 1 more
      entries): the result is written once, a is copied once into the wider operand (free when it needs a cast
      anyway).
    - ``"addmm"``: ``scale * left @ right + bias`` first, then the GEMM adds onto it (``beta = 1``): one extra write
      and read of the [M, P] result.
    - None: the one that moves fewer bytes (:func:`lora_placement`).

    ``out`` of the compute dtype is written in place (``accumulate``: added onto). An fp32 ``out`` with half
    compute (fp32 activations, bf16 autocast) is written by cuBLAS directly when overwritten and the extra terms
    are concatenated (CUDA); otherwise it receives the finished result in one more pass.
    """
    M, P, Q = _problem(a, w, weight_transposed, out, accumulate)
    dtype = a.dtype if dtype is None else dtype
    terms = (0 if lora is None else lora[0].shape[1]) + (bias is not None)
    if placement is None:
        placement = lora_placement(a.dtype, dtype, Q, P, terms)
    elif placement not in ("concat", "addmm"):
        raise ValueError(f"placement must be 'concat', 'addmm' or None, got {placement!r}")
    concat = placement == "concat" and terms > 0
    if concat:
        lhs, rhs = _concatenated(a, w, weight_transposed, lora, scale, bias, dtype, terms)
    else:
        lhs = a.to(dtype)
        rhs = dequantize_4bit(w, torch.empty(w.shape, dtype=dtype, device=a.device))
        rhs = rhs.t() if weight_transposed else rhs
    if out is not None and not accumulate and (concat or not terms) and _mm_writes_fp32(out, dtype):
        return torch.mm(lhs, rhs, out_dtype=torch.float32, out=out)
    direct = out is not None and out.dtype == dtype
    result = out if direct else torch.empty(M, P, dtype=dtype, device=a.device)
    init = result if direct and accumulate else None  # what the next product adds onto (None: overwrite)
    if not concat:
        if bias is not None:
            if init is None:
                init = bias.to(dtype)
            else:  # correct, not fast: our ops never accumulate a product with a bias
                result.add_(bias.to(dtype))
        if lora is not None:
            _add_product(result, init, lora[0].to(dtype), lora[1].to(dtype), scale)
            init = result
    _add_product(result, init, lhs, rhs)
    del lhs, rhs  # the weight buffer back to the allocator now, before a conversion below allocates
    if direct or out is None:
        return result
    return out.add_(result) if accumulate else out.copy_(result)


def dequant_matmul_4bit_lora_sum(terms: Sequence[tuple[torch.Tensor, Any, tuple[torch.Tensor, torch.Tensor] | None,
                                                       float]], *, dtype: torch.dtype,
                                 out: torch.Tensor) -> torch.Tensor:
    """``out = sum_i a_i @ W_i + scale_i * left_i @ right_i`` over ``terms`` ``(a_i, W_i, (left_i, right_i) or None,
    scale_i)``: the input gradient of projections that share their input (q/k/v), as one cuBLAS GEMM over their
    concatenated reductions, ``[a_1 | left_1 | a_2 | ...] @ [W_1; scale_1 * right_1; W_2; ...]``.

    Each W_i is dequantized into its rows of the operand buffer, with its scaled right factor below it, by one
    launch. Beside :func:`dequant_matmul_4bit_lora` once per projection (``weight_transposed=False``, accumulating),
    that saves a cat and a GEMM per extra projection, and for an fp32 ``out`` its half-precision product and the pass
    adding it into ``out``. ``a_i`` [M, P_i] and W_i [P_i, Q], ``left_i`` [M, r_i] and ``right_i`` [r_i, Q], any
    float dtypes; ``out`` [M, Q] is overwritten, ``dtype`` is the compute dtype."""
    M, Q = out.shape
    heights = []
    for a, w, lora, _ in terms:
        if a.shape[0] != M or tuple(w.shape) != (a.shape[1], Q) or (lora is not None and (
                lora[0].shape[0] != M or lora[1].shape != (lora[0].shape[1], Q))):
            raise ValueError(f"a term does not fit out [{M}, {Q}]: a {list(a.shape)}, W {list(w.shape)}, LoRA "
                             f"{None if lora is None else [list(lora[0].shape), list(lora[1].shape)]}")
        heights.append(w.shape[0] + (0 if lora is None else lora[0].shape[1]))
    total = sum(heights)
    width = cdiv(total, 8) * 8  # 16-byte operand rows for cuBLAS
    lhs = torch.empty(M, width, dtype=dtype, device=out.device)
    parts = [t for a, _, lora, _ in terms for t in ((a,) if lora is None else (a, lora[0]))]
    torch.cat(parts, dim=1, out=lhs if width == total else lhs[:, :total])
    rhs = torch.empty(width, Q, dtype=dtype, device=out.device)
    row = 0
    for (_, w, lora, scale), height in zip(terms, heights, strict=True):
        if lora is None:
            dequantize_4bit(w, rhs[row: row + height])
        else:
            dequantize_4bit(w, rhs[row: row + height], extra=lora[1], extra_at=(w.shape[0], 0), extra_scale=scale)
        row += height
    if width > total:  # both sides: garbage times zero can be NaN
        lhs[:, total:].zero_()
        rhs[total:].zero_()
    if _mm_writes_fp32(out, dtype):
        return torch.mm(lhs, rhs, out_dtype=torch.float32, out=out)
    if out.dtype == dtype:
        return torch.mm(lhs, rhs, out=out)
    return out.copy_(torch.mm(lhs, rhs))
