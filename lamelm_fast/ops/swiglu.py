"""SwiGLU, ``silu(gate) * up``: the elementwise core of Llama-style MLPs, fused (one pass forward, one backward).

Autograd over PyTorch's ``act_fn(gate_proj(x)) * up_proj(x)`` keeps g, silu(g) and u for backward and runs ~5
elementwise passes over [tokens, intermediate] forward and ~11 backward; :func:`swiglu` keeps g and u only, reads
g and u and writes h forward, reads dh, g and u and writes dg and du backward. On the Triton backend
(``lamelm_fast.kernels.swiglu``) the values equal PyTorch's eager ops, roundings of 16-bit inputs included; the torch
reference (CPU) runs those eager ops themselves.

Under torch.compile :func:`swiglu` is ``F.silu(gate) * up`` itself: inductor fuses it, and recomputes silu(gate)
in backward as we do.

:func:`patch_swiglu` makes the MLPs of Llama, Mistral and Qwen2/3 models (under PEFT wrappers too) use it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lamelm_fast.ops._patch import mixed_in_class
from lamelm_fast.ops.dispatch import resolve_backend

# Transformers MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def swiglu_values(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    """``silu(gate) * up`` without autograd; ``gate`` and ``up`` of one shape and dtype."""
    if backend == "torch":
        return F.silu(gate) * up
    from lamelm_fast.kernels.swiglu import swiglu_forward

    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    swiglu_forward(gate, up, out)
    return out


def swiglu_gradients(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str, *,
                     overwrite_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``silu(gate) * up`` for the output gradient ``grad``, without autograd.

    ``overwrite_grad``: the caller owns ``grad`` and no longer needs it, so d gate may be written over it.
    """
    if backend == "torch":
        grad_up = grad * F.silu(gate)
        grad_activation = grad.mul_(up) if overwrite_grad else grad * up
        # silu's own backward, written over its input gradient (the out= form of what autograd calls)
        return torch.ops.aten.silu_backward.grad_input(grad_activation, gate, grad_input=grad_activation), grad_up
    from lamelm_fast.kernels.swiglu import swiglu_backward

    gate, up = gate.contiguous(), up.contiguous()
    grad_in_place = overwrite_grad and grad.is_contiguous() and grad.dtype == gate.dtype
    grad = grad.contiguous()
    grad_gate = grad if grad_in_place else torch.empty_like(gate)
    grad_up = torch.empty_like(up)
    swiglu_backward(grad, gate, up, grad_gate, grad_up)
    return grad_gate, grad_up


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.backend = backend
        ctx.save_for_backward(gate, up)
        return swiglu_values(gate, up, backend)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = swiglu_gradients(grad, gate, up, ctx.backend)
        return grad_gate, grad_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, differentiable in both, with the same values; fused on CUDA (Triton)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate and up must match in shape, dtype and device, got {tuple(gate.shape)} "
                         f"{gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if torch.compiler.is_compiling():  # traced: inductor fuses it and recomputes silu(gate) in backward, as we do
        return F.silu(gate) * up
    backend = "torch" if gate.dtype == torch.float64 else resolve_backend(gate.device)
    return _SwiGLUFunction.apply(gate, up, backend)


def is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A transformers Llama-style MLP (by class, patched subclasses included) with a SiLU activation."""
    return (any(cls.__name__ in SWIGLU_MLP_CLASSES for cls in type(module).__mro__)
            and is_silu(getattr(module, "act_fn", None)))


class SwiGLUMLP:
    """Mixed in front of a Llama-style MLP class: the same projections around :func:`swiglu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def patch_swiglu(model: nn.Module) -> int:
    """Make every Llama-style MLP with a SiLU activation in ``model`` run :func:`swiglu`, in place.

    Parameters, names and state dict are unchanged (the module's class gains a forward). Idempotent; MLPs that the
    4-bit LoRA patch already fused are counted, not changed. Returns the number of MLPs now using it.
    """
    count = 0
    for module in model.modules():
        if not is_swiglu_mlp(module):
            continue
        if not isinstance(module, SwiGLUMLP):
            module.__class__ = mixed_in_class(SwiGLUMLP, type(module), "SwiGLU")
        count += 1
    return count
