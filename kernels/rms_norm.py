"""RMSNorm over the last dimension, forward and backward, each row held in registers in one pass.

Forward: ``y = xhat * (offset + w)`` with ``xhat = x * rstd``, ``rstd = 1 / sqrt(mean(x^2) + eps)`` in fp32; one read
of ``x`` and one write of ``y``, plus the fp32 ``rstd`` of each row (4 bytes) when a backward will follow. Two
casting modes, as Hugging Face's models compute it:

- ``CAST_BEFORE_WEIGHT`` (Llama, Mistral, Qwen2/3): ``xhat`` is rounded to the input dtype before the multiply by
  the weight (``weight * xhat.to(input_dtype)``), the product is taken in fp32 and rounded once to the output dtype
  (the promotion of the input and weight dtypes); an ``offset`` is added to the weight in the weight's dtype.
- otherwise (Gemma 1/2/3): ``(xhat * (offset + w.float())).to(input dtype)``, everything in fp32, one rounding.

Backward: ``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * (offset + w)``, in fp32 (the cast of ``xhat``
passes the gradient through unchanged, as autograd does); reads ``x`` and ``dy``, writes ``dx``. The weight gradient
``sum_rows dy * xhat`` (``xhat`` as the forward multiplied it: rounded in the Llama mode) goes into one fp32 row of
partial sums per program, which torch sums (see :func:`rms_norm_backward` for why not atomics).

Rows of up to :data:`MAX_HIDDEN` elements; narrow rows (Qwen3's per-head q/k norms, 128 wide) go several to a
program. Row offsets are int64: rows * stride passes 2^31 for long sequences of wide rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lamelm_fast.kernels._grid import cdiv, next_power_of_2, persistent_programs

# The widest row one program holds in registers: a row is read once, never re-read from memory. 32768 fp32 values are
# 32 per thread per tensor at 32 warps; wider rows would spill, and no causal LM has them (Llama 3.1 405B: 16384).
MAX_HIDDEN = 32768
# Elements per program that make narrow rows worth batching: a 128-wide row alone would leave most lanes idle.
_TILE_ELEMENTS = 2048
# Backward programs per SM when the weight needs a gradient: each one loops over its share of rows and writes one fp32
# row of partial dW sums. Four per SM keep enough loads in flight; the partial rows cost 2 x 4 x programs x H bytes.
_PROGRAMS_PER_SM = 4


@triton.jit
def _effective_weight(w_ptr, cols, col_mask, OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr):
    # offset + w in fp32, as a [1, BLOCK] row in the layout of the [ROWS, BLOCK] tiles (no layout conversion). The
    # Llama mode adds the offset in the weight's dtype, as torch's (offset + weight) does.
    w = tl.load(w_ptr + cols[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
    if OFFSET != 0.0:
        w = w + OFFSET
        if CAST_BEFORE_WEIGHT:
            w = w.to(w_ptr.dtype.element_ty).to(tl.float32)
    return w


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, x_row_stride,  # [rows, H], unit column stride
    w_ptr,  # [H]
    y_ptr, y_row_stride,  # [rows, H] out, unit column stride
    rstd_ptr,  # [rows] fp32 out, when STORE_RSTD
    n_rows, n_cols, eps,
    OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, STORE_RSTD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = _effective_weight(w_ptr, cols, col_mask, OFFSET, CAST_BEFORE_WEIGHT)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    xhat = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        xhat = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    y = xhat * w
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, dy_row_stride,  # [rows, H], unit column stride
    x_ptr, x_row_stride,  # [rows, H], unit column stride
    w_ptr,  # [H]
    rstd_ptr,  # [rows] fp32, from the forward
    dx_ptr, dx_row_stride,  # [rows, H] out, when HAS_DX
    dw_partial_ptr,  # [programs, H] fp32 out, when HAS_DW
    n_rows, n_cols, tiles_per_program,
    OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = _effective_weight(w_ptr, cols, col_mask, OFFSET, CAST_BEFORE_WEIGHT)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, tiles_per_program):
        rows = (program * tiles_per_program + i) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # Rows past the end load as zeros (rstd 0 too), so they add nothing to dW.
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_DX:
            g = dy * w
            mean_gx = tl.sum(g * xhat, axis=1) / n_cols
            dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        if HAS_DW:
            if CAST_BEFORE_WEIGHT:
                xhat = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)  # what the forward multiplied the weight by
            dw += tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(dw_partial_ptr + program * n_cols + cols, dw, mask=col_mask)


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): a power-of-two block over the whole row, narrow rows batched to ~2048 elements."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm kernels hold a row of at most {MAX_HIDDEN} elements in registers, got a hidden "
                         f"size of {n_cols}; use the torch backend for wider rows")
    block = next_power_of_2(n_cols)
    rows = max(1, _TILE_ELEMENTS // block)
    elements = block * rows
    num_warps = 32 if elements >= 32768 else 16 if elements >= 8192 else 8 if elements >= 2048 else 4
    return block, rows, num_warps


def _check_rows(name: str, t: torch.Tensor, n_rows: int, n_cols: int) -> None:
    if t.dim() != 2 or tuple(t.shape) != (n_rows, n_cols) or (n_rows > 0 and n_cols > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be [{n_rows}, {n_cols}] with unit column stride, "
                         f"got {tuple(t.shape)} strides {t.stride()}")


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    rstd: torch.Tensor | None,
    *,
    eps: float,
    offset: float,
    cast_before_weight: bool,
) -> None:
    """RMSNorm of the rows of ``x`` ([rows, H], unit column stride, any row stride) into ``out`` (same layout rules;
    its dtype is the output dtype), and each row's fp32 ``1 / sqrt(mean(x^2) + eps)`` into ``rstd`` ([rows]) when
    given (a backward needs it)."""
    n_rows, n_cols = x.shape
    _check_rows("out", out, n_rows, n_cols)
    if weight.shape != (n_cols,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{n_cols}] tensor, got {tuple(weight.shape)}")
    block, rows, num_warps = _launch_config(n_cols)
    _check_rows("x", x, n_rows, n_cols)
    if n_rows == 0:
        return
    if rstd is not None and (rstd.shape != (n_rows,) or rstd.dtype != torch.float32 or not rstd.is_contiguous()):
        raise ValueError(f"rstd must be a contiguous fp32 [{n_rows}] tensor")
    _rms_norm_forward_kernel[(cdiv(n_rows, rows),)](
        x, x.stride(0), weight, out, out.stride(0), rstd if rstd is not None else out,
        n_rows, n_cols, float(eps),
        OFFSET=float(offset), CAST_BEFORE_WEIGHT=cast_before_weight, STORE_RSTD=rstd is not None,
        ROWS=rows, BLOCK=block, num_warps=num_warps,
    )


def rms_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    grad_x: torch.Tensor | None,
    *,
    offset: float,
    cast_before_weight: bool,
    weight_grad: bool,
) -> torch.Tensor | None:
    """Gradients of :func:`rms_norm_forward`: ``grad_x`` ([rows, H] out, in the input dtype) when given, and the
    returned fp32 weight gradient ([H]) when ``weight_grad``. ``rstd`` is what the forward stored.

    The weight gradient is a sum over all rows. Each program keeps its rows' sum in registers and writes it as one fp32
    row of a [programs, H] buffer that torch then sums (Liger's approach): deterministic (a fixed grid and summation
    order give the same bits every run, which fp32 atomics would not), no zero fill and no contention, and the buffer
    costs a few percent of the traffic (4 x SMs rows against the tens of thousands of rows of x and dy).
    """
    n_rows, n_cols = x.shape
    block, rows, num_warps = _launch_config(n_cols)
    for name, t in (("grad_out", grad_out), ("x", x)) + ((("grad_x", grad_x),) if grad_x is not None else ()):
        _check_rows(name, t, n_rows, n_cols)
    if weight.shape != (n_cols,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{n_cols}] tensor, got {tuple(weight.shape)}")
    if rstd.shape != (n_rows,) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rstd must be a contiguous fp32 [{n_rows}] tensor")
    if n_rows == 0 or (grad_x is None and not weight_grad):
        return torch.zeros(n_cols, dtype=torch.float32, device=x.device) if weight_grad else None
    tiles = cdiv(n_rows, rows)
    if weight_grad:
        programs = persistent_programs(x.device, _PROGRAMS_PER_SM, elsewhere=_PROGRAMS_PER_SM)
        tiles_per_program = cdiv(tiles, min(tiles, programs))
        programs = cdiv(tiles, tiles_per_program)
        partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    else:  # no reduction across rows: one tile per program, as many programs as the GPU can take
        tiles_per_program, programs, partial = 1, tiles, rstd
    _rms_norm_backward_kernel[(programs,)](
        grad_out, grad_out.stride(0), x, x.stride(0), weight, rstd,
        grad_x if grad_x is not None else x, grad_x.stride(0) if grad_x is not None else 0, partial,
        n_rows, n_cols, tiles_per_program,
        OFFSET=float(offset), CAST_BEFORE_WEIGHT=cast_before_weight, HAS_DX=grad_x is not None,
        HAS_DW=weight_grad, ROWS=rows, BLOCK=block, num_warps=num_warps,
    )
    return partial.sum(0) if weight_grad else None
