"""SwiGLU's elementwise part, ``h = silu(g) * u``, and its gradient, one Triton pass each.

The MLP's three matmuls stay where they are (cuBLAS, or the 4-bit kernels); this file holds what sits between them.
PyTorch runs ``silu(g) * u`` as two kernels (5 passes over [tokens, intermediate]) and its backward as three or more
(dh * u, silu's backward, dh * silu(g): ~11 passes, plus the recompute of silu(g)); here the forward reads g and u and
writes h (3 passes) and the backward reads dh, g and u and writes dg and du (5 passes), dg possibly over dh.

Roundings follow PyTorch's eager ops on 16-bit inputs, so the values equal the model's own forward and backward:
silu(g) is rounded to the input dtype before the product; in backward ``dh * u`` is rounded before silu's
derivative is applied. Everything else is computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lamelm_fast.kernels._grid import cdiv

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, i.e. 16-byte (and wider) accesses
NUM_WARPS = 8


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n passes 2^31 at long contexts
    mask = offsets < n
    g_in = tl.load(gate_ptr + offsets, mask=mask, other=0.0)
    g = g_in.to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    activation = (g / (1.0 + tl.exp(-g))).to(g_in.dtype).to(tl.float32)
    tl.store(out_ptr + offsets, (activation * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g_in = tl.load(gate_ptr + offsets, mask=mask, other=0.0)
    g = g_in.to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    activation = (g * sig).to(g_in.dtype).to(tl.float32)
    grad_activation = (dh * u).to(g_in.dtype).to(tl.float32)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    tl.store(grad_gate_ptr + offsets, (grad_activation * sig * (1.0 + g * (1.0 - sig))).to(
        grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + offsets, (dh * activation).to(grad_up_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (cdiv(n, BLOCK),)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """``out = silu(gate) * up``; all three contiguous, of one shape (``out`` may be any float dtype)."""
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[_grid(n)](gate, up, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_gate: torch.Tensor,
                    grad_up: torch.Tensor) -> None:
    """``grad_gate = d silu(gate) * (grad * up)``, ``grad_up = grad * silu(gate)``; all contiguous, of one shape.
    ``grad_gate`` may be ``grad`` itself (each element is read before it is written)."""
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[_grid(n)](grad, gate, up, grad_gate, grad_up, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
