"""Rotary position embedding (RoPE) as HF Llama applies it, ``x * cos + rotate_half(x) * sin``, and its gradient,
one Triton pass each for q and k together.

transformers' ``apply_rotary_pos_emb`` runs ~9 elementwise passes over q and k forward (rotate_half's two slices,
neg, cat, two products, the sum) and about as many backward; here one launch reads q, k, cos and sin once and writes
the two results once, and the backward reads dq_embed, dk_embed, cos and sin once and writes dq and dk once.

Layout: q is [B, H, S, d] as HF hands it over, a transposed view of the projection output (strides (S*H*d, d, H*d,
1)): the H heads of one token are contiguous in memory. So a program takes one token and a block of its heads, a
[BLOCK_H, d] tile read and written row after row, and the two halves of d separately (``rotate_half`` pairs element
i with i +- d/2). Every tensor is read through its strides (no copies of the transposed views); cos and sin are
[B, S, d] (a batch stride of 0 broadcasts one row of positions). Offsets are int64: B*S*H*d passes 2^31 at long
contexts. d must be even; it need not be a power of two (80, 96): the half tile is padded and masked.

Roundings follow PyTorch's eager ops: each product is computed in fp32 and rounded to the result dtype (torch's
promotion of q's and cos's dtypes) before the sum, so 16-bit results equal the eager ones (and fp32 ones too:
the kernel is compiled without fma contraction). Backward, like autograd
over the eager ops: each product is rounded to the output gradient's dtype, then to the input's dtype, before the
sum, which is rounded to the input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lamelm_fast.kernels._grid import cdiv, next_power_of_2

MAX_TILE = 1024  # elements of one half tile, [BLOCK_H, BLOCK_HALF]: a program moves 2 x this per tensor
NUM_WARPS = 4


@triton.jit
def _rope_heads(x_ptr, out_ptr, b, s, head0, heads, x_sb, x_sh, x_ss, x_sd, o_sb, o_sh, o_ss, o_sd,
                cos_lo, cos_hi, sin_lo, sin_hi, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BACKWARD: tl.constexpr, FP32_PRODUCTS: tl.constexpr):
    """One token's heads [head0, head0 + BLOCK_H) of one tensor: out = rope(x) (x = the output gradient backward).
    FP32_PRODUCTS: the op's own dtype is fp32 though the output (forward) or the gradient (backward) is narrower
    (written under autocast): products and sums stay fp32 and the result is rounded once, as autocast's cast does."""
    h = (head0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    mask = (h < heads)[:, None] & (i < HALF)[None, :]
    x_lo_ptr = x_ptr + (b * x_sb + s * x_ss + h[:, None] * x_sh + i[None, :] * x_sd)
    o_lo_ptr = out_ptr + (b * o_sb + s * o_ss + h[:, None] * o_sh + i[None, :] * o_sd)
    x_lo_in = tl.load(x_lo_ptr, mask=mask, other=0.0)
    x_lo = x_lo_in.to(tl.float32)
    x_hi = tl.load(x_lo_ptr + HALF * x_sd, mask=mask, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    if BACKWARD:
        # dx_lo = g_lo cos_lo + g_hi sin_hi, dx_hi = g_hi cos_hi - g_lo sin_lo; autograd rounds each product to the
        # gradient's dtype (the product's), then to the input's (its engine casts), and sums in the input's dtype.
        g_ty = tl.float32 if FP32_PRODUCTS else x_lo_in.dtype
        lo = ((x_lo * cos_lo).to(g_ty).to(out_ty).to(tl.float32)
              + (x_hi * sin_hi).to(g_ty).to(out_ty).to(tl.float32))
        hi = ((x_hi * cos_hi).to(g_ty).to(out_ty).to(tl.float32)
              - (x_lo * sin_lo).to(g_ty).to(out_ty).to(tl.float32))
    else:
        # out_lo = x_lo cos_lo - x_hi sin_lo, out_hi = x_hi cos_hi + x_lo sin_hi; each product rounded, as eager
        p_ty = tl.float32 if FP32_PRODUCTS else out_ty
        lo = (x_lo * cos_lo).to(p_ty).to(tl.float32) - (x_hi * sin_lo).to(p_ty).to(tl.float32)
        hi = (x_hi * cos_hi).to(p_ty).to(tl.float32) + (x_lo * sin_hi).to(p_ty).to(tl.float32)
    tl.store(o_lo_ptr, lo.to(out_ty), mask=mask)
    tl.store(o_lo_ptr + HALF * o_sd, hi.to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len, q_heads, k_heads, q_blocks,
                 q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd,
                 qo_sb, qo_sh, qo_ss, qo_sd, ko_sb, ko_sh, ko_ss, ko_sd,
                 cos_sb, cos_ss, cos_sd, sin_sb, sin_ss, sin_sd,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr, FP32_PRODUCTS: tl.constexpr):
    # HALF = d / 2 is a constant: the masks and the second half's offset are then known to the compiler, which
    # vectorises the accesses at d = 80 or 96 too (a handful of head dims exist, each compiles once)
    # axis 0: the token (b, s); axis 1: a block of q's heads, then a block of k's
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b = token // seq_len
    s = token % seq_len
    i = tl.arange(0, BLOCK_HALF)
    cmask = i < HALF
    cos_row = cos_ptr + b * cos_sb + s * cos_ss + i * cos_sd
    sin_row = sin_ptr + b * sin_sb + s * sin_ss + i * sin_sd
    cos_lo = tl.load(cos_row, mask=cmask, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_row + HALF * cos_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_row, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_row + HALF * sin_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if block < q_blocks:
        _rope_heads(q_ptr, q_out_ptr, b, s, block * BLOCK_HQ, q_heads, q_sb, q_sh, q_ss, q_sd,
                    qo_sb, qo_sh, qo_ss, qo_sd, cos_lo, cos_hi, sin_lo, sin_hi, HALF, BLOCK_HQ, BLOCK_HALF, BACKWARD,
                    FP32_PRODUCTS)
    else:
        _rope_heads(k_ptr, k_out_ptr, b, s, (block - q_blocks) * BLOCK_HK, k_heads, k_sb, k_sh, k_ss, k_sd,
                    ko_sb, ko_sh, ko_ss, ko_sd, cos_lo, cos_hi, sin_lo, sin_hi, HALF, BLOCK_HK, BLOCK_HALF, BACKWARD,
                    FP32_PRODUCTS)


def _block_heads(heads: int, block_half: int) -> int:
    return max(1, min(next_power_of_2(max(heads, 1)), MAX_TILE // block_half))


def _launch(x_q: torch.Tensor, x_k: torch.Tensor | None, out_q: torch.Tensor, out_k: torch.Tensor | None,
            cos: torch.Tensor, sin: torch.Tensor, backward: bool, fp32_products: bool) -> None:
    batch, q_heads, seq_len, dim = x_q.shape
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {dim}")
    if x_k is None:  # q only: k's slot points at q's tensors, with no heads
        x_k, out_k, k_heads = x_q, out_q, 0
    else:
        k_heads = x_k.shape[1]
    half = dim // 2
    block_half = next_power_of_2(max(half, 1))
    block_hq, block_hk = _block_heads(q_heads, block_half), _block_heads(k_heads, block_half)
    q_blocks, k_blocks = cdiv(q_heads, block_hq), cdiv(k_heads, block_hk)
    tokens = batch * seq_len
    if tokens == 0 or half == 0 or q_blocks + k_blocks == 0:
        return
    _rope_kernel[(tokens, q_blocks + k_blocks)](
        x_q, x_k, out_q, out_k, cos, sin, seq_len, q_heads, k_heads, q_blocks,
        *x_q.stride(), *x_k.stride(), *out_q.stride(), *out_k.stride(), *cos.stride(), *sin.stride(),
        HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BACKWARD=backward,
        FP32_PRODUCTS=fp32_products, num_warps=NUM_WARPS,
        enable_fp_fusion=False)  # no a * b + c -> fma: fp32 results equal the eager ops' too


def rope_forward(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 q_out: torch.Tensor, k_out: torch.Tensor | None, fp32_products: bool = False) -> None:
    """``q_out = q * cos + rotate_half(q) * sin`` (cos and sin broadcast over heads), the same for k.

    q [B, H, S, d] and k [B, Hk, S, d] (k may be None, with k_out), any strides; cos and sin [B, S, d], any strides
    (0 for a broadcast batch); outputs of the inputs' shapes, any strides and float dtype (the product's rounding;
    ``fp32_products``: computed in fp32 and rounded once to the outputs' narrower dtype).
    """
    _launch(q, k, q_out, k_out, cos, sin, backward=False, fp32_products=fp32_products)


def rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  dq: torch.Tensor, dk: torch.Tensor | None, fp32_products: bool = False) -> None:
    """The gradients of :func:`rope_forward`'s inputs from its outputs' (``grad_q``, ``grad_k``, of the outputs'
    dtype): ``dq = grad_q * cos + R^T(grad_q * sin)``, ``R^T(y) = cat(y[..., d/2:], -y[..., :d/2])``, written in
    ``dq``'s dtype (the input's); the same for k. Shapes and strides as in :func:`rope_forward`
    (``fp32_products``: the forward's, the gradients taken as fp32)."""
    _launch(grad_q, grad_k, dq, dk, cos, sin, backward=True, fp32_products=fp32_products)
