"""Fused RMSNorm with Hugging Face's numerics: the autograd Function, its torch reference, and the model patch.

``rms_norm(x, weight, eps, offset=0.0, cast_before_weight=True)`` computes, over the last dimension,

- ``cast_before_weight=True`` (Llama, Mistral, Qwen2, Qwen3): ``h = x.float(); h = h * rsqrt(mean(h^2) + eps);
  (offset + weight) * h.to(x.dtype)``; the result has the promotion of the weight and input dtypes (an fp32 weight
  on a bf16 input gives fp32);
- ``cast_before_weight=False`` (Gemma, Gemma2, Gemma3, with ``offset=1``): ``(norm(x.float()) * (offset +
  weight.float())).to(x.dtype)``.

Backends (:func:`lamelm_fast.ops.dispatch.resolve_backend`; there is no CUDA-extension implementation, so the CUDA
backend runs Triton):

- ``torch`` (the CPU path and the test oracle): the formula above in torch ops, exactly HF's, autograd included.
- ``triton``: lamelm_fast.kernels.rms_norm; the forward reads x once and writes y once, the backward reads x and dy and
  writes dx, in fp32. What is kept for backward: x (the input itself, no copy when its last dim is contiguous) and one
  fp32 per row, against HF's several [rows, H] fp32 intermediates. fp64 inputs and rows wider than the kernel's
  limit take the reference (the latter only under ``auto``; an explicit ``triton`` request raises).

Under torch.compile :func:`rms_norm` is the torch formula whatever the backend: inductor fuses it into a kernel of its
own (a Triton kernel would be opaque to it and break the graph).

:func:`patch_rms_norm` swaps the forward of the RMSNorm modules of the families above (by class, checked against the
formula once per class) for :func:`rms_norm`, in place.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from lamelm_fast.ops._patch import mixed_in_class
from lamelm_fast.ops.dispatch import BackendUnavailable, requested_backend, resolve_backend

__all__ = ["patch_rms_norm", "rms_norm", "rms_norm_reference"]

logger = logging.getLogger(__name__)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
                       cast_before_weight: bool = True) -> torch.Tensor:
    """HF's RMSNorm formula in torch ops, op for op (the same bits as ``LlamaRMSNorm`` / ``GemmaRMSNorm``)."""
    if cast_before_weight:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + eps)
        return (offset + weight if offset else weight) * h.to(input_dtype)
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (offset + weight.float())
    return out.type_as(x)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool,
             keep_rstd: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's forward of 2-D ``x``: the output (the promotion of weight and input dtypes in the Llama mode, the
    input dtype in Gemma's) and, when ``keep_rstd``, each row's fp32 rstd for backward."""
    from lamelm_fast.kernels.rms_norm import rms_norm_forward

    dtype = torch.promote_types(weight.dtype, x.dtype) if cast_before_weight else x.dtype
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if keep_rstd else None
    rms_norm_forward(x, weight, out, rstd, eps=eps, offset=offset, cast_before_weight=cast_before_weight)
    return out, rstd


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                offset: float, cast_before_weight: bool) -> torch.Tensor:
        out, rstd = _forward(x, weight, eps, offset, cast_before_weight, keep_rstd=True)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from lamelm_fast.kernels.rms_norm import rms_norm_backward

        x, weight, rstd = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        if grad_out.shape[1] > 1 and grad_out.stride(1) != 1:  # e.g. a gradient expanded from a scalar
            grad_out = grad_out.contiguous()
        # A new buffer, never dy in place: autograd may hand the same gradient tensor to another branch (the residual
        # add before the norm passes its incoming gradient to both of its inputs).
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        grad_weight = rms_norm_backward(grad_out, x, weight, rstd, grad_x, offset=ctx.offset,
                                        cast_before_weight=ctx.cast_before_weight, weight_grad=need_weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None, None


def _backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return "torch"  # the kernel computes in fp32; fp64 is the oracle dtype
    backend = resolve_backend(x.device)
    if backend == "torch":
        return backend
    from lamelm_fast.kernels.rms_norm import MAX_HIDDEN

    if x.shape[-1] > MAX_HIDDEN:
        if requested_backend() == "auto":
            return "torch"
        raise BackendUnavailable(f"the Triton RMSNorm holds rows of at most {MAX_HIDDEN} elements, got "
                                 f"{x.shape[-1]}; use --kernels auto or torch")
    return "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm of ``x`` ([..., H]) with ``weight`` ([H]) as Hugging Face computes it (see the module docstring):
    ``cast_before_weight=True, offset=0`` is Llama/Mistral/Qwen2/Qwen3, ``cast_before_weight=False, offset=1`` is
    Gemma/Gemma2/Gemma3. Differentiable in ``x`` and ``weight``."""
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating [..., H] tensor, got {x.dtype} {tuple(x.shape)}")
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating [{hidden}] tensor, got {weight.dtype} {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x and weight must share a device, got {x.device} and {weight.device}")
    if hidden == 0:
        raise ValueError("rms_norm needs a hidden size >= 1")
    if torch.compiler.is_compiling() or _backend(x, weight) == "torch":  # (compiled: see the module docstring)
        return rms_norm_reference(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight)

    x2d = x.reshape(-1, hidden)  # a view whenever the leading dims allow one (row stride passed to the kernel)
    if hidden > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    weight_c = weight.contiguous()
    offset, eps = float(offset), float(eps)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _RMSNormFunction.apply(x2d, weight_c, eps, offset, cast_before_weight)
    else:  # inference or a frozen norm on frozen input: no rstd, no graph
        out, _ = _forward(x2d, weight_c, eps, offset, cast_before_weight, keep_rstd=False)
    return out.view(x.shape)


# --- patching Hugging Face models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Formula:
    offset: float
    cast_before_weight: bool
    eps_attr: str


_LLAMA = _Formula(offset=0.0, cast_before_weight=True, eps_attr="variance_epsilon")
_GEMMA = _Formula(offset=1.0, cast_before_weight=False, eps_attr="eps")
# Class names of transformers' RMSNorm modules and the formula each one computes (read from transformers 5.x; each is
# also checked against that formula once per process before any module of it is patched).
_FORMULAS = {
    "LlamaRMSNorm": _LLAMA, "MistralRMSNorm": _LLAMA, "MixtralRMSNorm": _LLAMA, "Qwen2RMSNorm": _LLAMA,
    "Qwen2MoeRMSNorm": _LLAMA, "Qwen3RMSNorm": _LLAMA, "Qwen3MoeRMSNorm": _LLAMA,
    "GemmaRMSNorm": _GEMMA, "Gemma2RMSNorm": _GEMMA, "Gemma3RMSNorm": _GEMMA,
}


class _FusedRMSNorm(nn.Module):
    """Mixed in front of a transformers RMSNorm class: the same module, parameters and state dict; forward fused."""

    _lamelm_formula: _Formula

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        formula = self._lamelm_formula
        return rms_norm(hidden_states, self.weight, getattr(self, formula.eps_attr), offset=formula.offset,
                        cast_before_weight=formula.cast_before_weight)


def _fused_class(norm_class: type, formula: _Formula) -> type:
    # (the formula is a function of the class: one per class, rebuilt with it when a patched model is unpickled)
    return mixed_in_class(_FusedRMSNorm, norm_class, "Fused", attributes=(("_lamelm_formula", formula),))


@functools.cache
def _formula_holds(norm_class: type, formula: _Formula) -> bool:
    """Whether ``norm_class.forward`` gives exactly :func:`rms_norm_reference`'s bits with ``formula``, on small CPU
    inputs in the dtype pairs that tell the casting modes apart (a changed formula in a new transformers release
    leaves its modules unpatched rather than silently changing the numbers)."""
    gen = torch.Generator().manual_seed(0)
    probe = norm_class.__new__(norm_class)
    nn.Module.__init__(probe)
    eps = 1e-5
    setattr(probe, formula.eps_attr, eps)
    pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
             (torch.float32, torch.bfloat16), (torch.float16, torch.float16))
    for x_dtype, w_dtype in pairs:
        probe.weight = nn.Parameter(torch.randn(24, generator=gen).to(w_dtype), requires_grad=False)
        x = (3 * torch.randn(5, 24, generator=gen)).to(x_dtype)
        try:
            with torch.no_grad():
                got = norm_class.forward(probe, x)
        except Exception:  # attributes or arguments we do not know of: not the formula we know
            return False
        want = rms_norm_reference(x, probe.weight, eps, offset=formula.offset,
                                  cast_before_weight=formula.cast_before_weight)
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or not torch.equal(got, want):
            return False
    return True


def _known_formula(module: nn.Module) -> _Formula | None:
    cls = type(module)
    formula = _FORMULAS.get(cls.__name__)
    # transformers' own classes only: a remote-code model's class of the same name may compute something else.
    if formula is None or not cls.__module__.startswith("transformers.models."):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(module, formula.eps_attr):
        return None
    eps = getattr(module, formula.eps_attr)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return None
    return formula


def patch_rms_norm(model: nn.Module) -> int:
    """Make the RMSNorm modules of Llama, Mistral/Mixtral, Qwen2/3 (MoE too) and Gemma 1/2/3 in ``model`` run
    :func:`rms_norm` (walks ``model.modules()``, so a PEFT wrapper is fine).

    In place: each module keeps its parameters, buffers and state dict; its class becomes a subclass of its own with
    the fused forward (eps is read from the module at every call). Modules of other classes, including ones whose
    class does not compute the formula we know (checked once per class), are left alone. Idempotent. Returns the
    number of norms that now run fused (including ones patched before).
    """
    fused = 0
    unchecked: set[str] = set()
    for module in model.modules():
        if isinstance(module, _FusedRMSNorm):
            fused += 1
            continue
        formula = _known_formula(module)
        if formula is None:
            continue
        cls = type(module)
        if not _formula_holds(cls, formula):
            unchecked.add(f"{cls.__module__}.{cls.__qualname__}")
            continue
        module.__class__ = _fused_class(cls, formula)
        fused += 1
    if unchecked:
        logger.warning("RMSNorm classes left unfused (their forward no longer matches the formula we fuse): %s",
                       ", ".join(sorted(unchecked)))
    return fused
