"""Cross-entropy over rows of logits, and its gradient, in one Triton program per row.

The LM head matmuls stay in cuBLAS (lamelm_fast/ops/cross_entropy.py calls them chunk by chunk); this file holds
what sits between them: for each row of a chunk of logits, an online logsumexp in fp32 over the vocabulary, the
loss (label smoothing, z-loss, softcap, logit scale), the argmax for token accuracy, and the gradient written over
the logits in place, so a chunk needs one buffer. Plus the in-place gradient scale that skips itself when the
scale is 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lamelm_fast.kernels._grid import cdiv, next_power_of_2


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    # The logits the loss sees: scaled, then (Gemma) softcapped as softcap * tanh(z / softcap).
    z = x * logit_scale
    if HAS_SOFTCAP:
        # tanh from exp, for Triton versions without tl.tanh; |z/c| is bounded by exp's range in fp32.
        t = tl.exp(-2.0 * tl.abs(z / softcap))
        z = tl.where(z >= 0, 1.0, -1.0) * softcap * (1.0 - t) / (1.0 + t)
    return z


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, logits_row_stride,  # [rows, V], rows are chunk rows; overwritten by the gradient if HAS_GRAD
    labels_ptr,  # [rows] int64
    loss_ptr,  # [rows] fp32 out
    correct_ptr,  # [rows] int32 out (argmax == label and not ignored), when WANT_CORRECT
    scale_ptr,  # gradient scale: 0-dim, or [rows] when ROW_SCALE
    V, ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    HAS_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_CORRECT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride  # int64: rows * V passes 2^31 for big vocabularies
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # A label outside the vocabulary (a tokenizer bigger than the model) poisons its row with NaN: raising would need
    # a host read, and reading the logit there would be reading past the row.
    in_vocab = (label >= 0) & (label < V)
    offsets = tl.arange(0, BLOCK_V)

    # Pass 1: running max m and running sum s of exp(z - m), sum of z (label smoothing) and the argmax.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, _transform(x, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        if WANT_CORRECT:
            # Strictly greater: the first maximal index wins, as in torch.argmax.
            block_index = tl.argmax(z, axis=0).to(tl.int64) + start
            take = block_max > best
            best_index = tl.where(take, block_index, best_index)
            best = tl.where(take, block_max, best)
    lse = m + tl.log(s)

    safe_label = tl.where(valid & in_vocab, label, 0)
    z_label = _transform(tl.load(row_ptr + safe_label).to(tl.float32), logit_scale, softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - label_smoothing) * z_label - label_smoothing * z_sum / V + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, tl.where(in_vocab, loss, float("nan")), 0.0))
    if WANT_CORRECT:
        tl.store(correct_ptr + row, (valid & (best_index == label)).to(tl.int32))

    if HAS_GRAD:
        # d loss / d z_j = softmax_j * (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == label], then the chain rule
        # through the softcap (1 - tanh^2) and the scale; ignored rows get exact zeros.
        if ROW_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        else:
            scale = tl.load(scale_ptr).to(tl.float32)
        scale = tl.where(valid, tl.where(in_vocab, scale * logit_scale, float("nan")), 0.0)
        softmax_factor = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z = _transform(x, logit_scale, softcap, HAS_SOFTCAP)
            grad = tl.exp(z - lse) * softmax_factor - label_smoothing / V
            grad = tl.where(cols == label, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                capped = z / softcap
                grad = grad * (1.0 - capped * capped)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_inplace_kernel(x_ptr, n, scale_ptr, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    # Reading the scale on the device lets a scale of 1 (a plain loss.backward()) cost no memory traffic and no
    # host sync: every program returns before touching the tensor.
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(x_ptr + offsets, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int, element_size: int) -> int:
    # 16 KB of logits per iteration keeps enough loads in flight without spilling the fp32 working set.
    return min(next_power_of_2(vocab), 16384 // element_size)


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    losses: torch.Tensor,
    correct: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    logit_scale: float,
    softcap: float | None,
) -> None:
    """Per-row losses into ``losses`` (fp32) and correct flags into ``correct`` (int32, optional); with
    ``grad_scale`` (0-dim or one per row) the scaled gradient w.r.t. the raw logits replaces ``logits`` in place.

    ``logits`` is [rows, V] with unit column stride; ``labels`` int64 [rows].
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1 and labels.dtype == torch.int64 and losses.dtype == torch.float32
    has_grad = grad_scale is not None
    scale = grad_scale if has_grad else losses  # an unused pointer when there is no gradient
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, losses, correct if correct is not None else losses, scale,
        vocab, ignore_index, label_smoothing, z_loss, logit_scale, softcap if softcap is not None else 1.0,
        HAS_GRAD=has_grad, ROW_SCALE=has_grad and grad_scale.dim() > 0, HAS_SOFTCAP=softcap is not None,
        WANT_CORRECT=correct is not None, BLOCK_V=_block_v(vocab, logits.element_size()),
        num_warps=16 if vocab >= 32768 else 8,
    )


def scale_inplace(x: torch.Tensor, scale: torch.Tensor) -> None:
    """``x *= scale`` for a contiguous ``x`` and a 0-dim device ``scale``; free when the scale is 1."""
    n = x.numel()
    if n == 0:
        return
    assert x.is_contiguous()
    block = 4096
    _scale_inplace_kernel[(cdiv(n, block),)](x, n, scale, BLOCK=block, num_warps=8)
