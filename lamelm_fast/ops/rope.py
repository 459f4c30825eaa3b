"""Rotary position embedding (RoPE) as transformers' Llama-style models apply it, fused: one pass forward, one back.

transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` computes ``q * cos + rotate_half(q) * sin`` (and the same for
k) with ~9 elementwise passes over q and k forward (rotate_half's slices, neg and cat, two products, the sum) and as
many backward. In QLoRA training (PEFT makes the hidden states fp32) that is fp32 traffic over q and k at every
layer, twice with gradient checkpointing. :func:`rotary_embedding` has the same semantics; on the Triton backend
(``lamelm_fast.kernels.rope``) it reads q, k, cos and sin once and writes the results once, with the eager ops'
roundings (16-bit results equal them); backward likewise. It keeps only cos and sin for backward (as eager does).
The torch backend (CPU) runs the eager formula itself.

:func:`patch_rope` makes the attention modules of one model (Llama, Mistral, Qwen2/3, Gemma 1/2/3; under PEFT
wrappers and gradient checkpointing too) use it, and no other model of the process: see its docstring.

Under torch.compile the eager formula is traced (inductor fuses it into a kernel of its own), and the patch's context
flag is neither set nor read (dynamo cannot trace a ContextVar).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lamelm_fast.ops._patch import mixed_in_class
from lamelm_fast.ops.dispatch import active_autocast_dtype, resolve_backend

# Transformers attention classes whose forward calls its modeling module's ``apply_rotary_pos_emb(q, k, cos, sin)``
# with q [B, heads, S, d], k [B, kv_heads, S, d] and cos, sin [B, S, d], that function being HF Llama's (checked
# in transformers 5.17 and 5.23; patch_rope also checks it numerically before it wraps one).
ROPE_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                          "GemmaAttention", "Gemma2Attention", "Gemma3Attention")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., d/2:], x[..., :d/2])``, transformers' own."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb``, op for op: the reference and the fallback."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def _kernel_layout(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin as [B, S, d] views (batch stride 0 when broadcast) when the kernel computes exactly what the eager
    formula does with ``unsqueeze_dim=1``; None when it does not handle these tensors."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return None
    batch, _, seq_len, dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:] or dim % 2:
        return None
    if not (q.dtype in _KERNEL_DTYPES and k.dtype in _KERNEL_DTYPES and cos.dtype in _KERNEL_DTYPES
            and sin.dtype == cos.dtype):
        return None
    if len({q.device, k.device, cos.device, sin.device}) != 1 or cos.requires_grad or sin.requires_grad:
        return None
    for table in (cos, sin):  # broadcast against [B, 1, S, d] after the unsqueeze: never wider than q
        if table.shape[0] not in (1, batch) or table.shape[1] not in (1, seq_len) or table.shape[2] != dim:
            return None
    return cos.expand(batch, seq_len, dim), sin.expand(batch, seq_len, dim)


def _output_dtype(x: torch.Tensor, table: torch.Tensor) -> torch.dtype:
    """Eager's result dtype (x's and the table's promotion), or autocast's where that is narrower: under autocast the
    only reader of the rotated q and k, attention, casts them to autocast's dtype first (sdpa and matmul are on its
    lower-precision list; our varlen path does the same), and the kernel rounds its fp32 result once, as that cast
    would. QLoRA's fp32 q/k and a bf16 full fine-tune's promoted ones then cost half the bytes written and no cast."""
    promoted = torch.promote_types(x.dtype, table.dtype)
    narrow = active_autocast_dtype(x.device)
    return narrow if narrow is not None and narrow.itemsize < promoted.itemsize else promoted


class _RotaryEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from lamelm_fast.kernels import rope as kernels

        # empty_like keeps the transposed-view strides of HF's q and k ([B, S, heads, d] in memory): the kernel then
        # writes each token's heads contiguously, and attention backends that want [B, S, heads, d] get it free.
        q_out = torch.empty_like(q, dtype=_output_dtype(q, cos))
        k_out = torch.empty_like(k, dtype=_output_dtype(k, cos))
        # Narrower than eager's dtype (autocast): computed as eager (fp32), rounded once (q and k promote alike).
        ctx.fp32_products = q_out.dtype != torch.promote_types(q.dtype, cos.dtype)
        kernels.rope_forward(q, k, cos, sin, q_out, k_out, ctx.fp32_products)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = ((q.dtype, q_out.stride()), (k.dtype, k_out.stride()))
        return q_out, k_out

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor):
        from lamelm_fast.kernels import rope as kernels

        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        # the input gradients in the inputs' dtypes and the outputs' (= inputs') memory layout
        (q_dtype, q_stride), (k_dtype, k_stride) = ctx.layouts
        dq = torch.empty_strided(grad_q.shape, q_stride, dtype=q_dtype, device=grad_q.device) if need_q else None
        dk = torch.empty_strided(grad_k.shape, k_stride, dtype=k_dtype, device=grad_k.device) if need_k else None
        if need_q:
            kernels.rope_backward(grad_q, grad_k if need_k else None, cos, sin, dq, dk, ctx.fp32_products)
        elif need_k:
            kernels.rope_backward(grad_k, None, cos, sin, dk, None, ctx.fp32_products)
        return dq, dk, None, None


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` with cos and sin unsqueezed at
    ``unsqueeze_dim``: transformers' ``apply_rotary_pos_emb``, same values and dtypes, differentiable in q and k.

    Fused (Triton) for HF's layout: q [B, heads, S, d], k [B, kv_heads, S, d] (any strides), cos and sin [B or 1, S,
    d] without gradient, ``unsqueeze_dim=1``, 16/32-bit floats; under autocast its results are in autocast's dtype
    where eager's would be wider (see :func:`_output_dtype`). Anything else, float64, and the torch backend run the
    eager formula.
    """
    if torch.compiler.is_compiling():  # traced: inductor fuses the formula into a kernel of its own
        return eager_rotary_embedding(q, k, cos, sin, unsqueeze_dim)
    backend = "torch" if torch.float64 in (q.dtype, k.dtype, cos.dtype) else resolve_backend(q.device)
    tables = _kernel_layout(q, k, cos, sin) if backend != "torch" and unsqueeze_dim == 1 else None
    if tables is None:
        return eager_rotary_embedding(q, k, cos, sin, unsqueeze_dim)
    return _RotaryEmbeddingFunction.apply(q, k, *tables)


# --- the patch: one model's attention modules, not the process ---------------------------------------------------

# Set while a patched attention module runs its forward; the wrapped module-level apply_rotary_pos_emb reads it.
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("lamelm_fast_rope_active", default=False)
_ORIGINAL_ATTR = "_lamelm_original"  # on our wrapper: the function it wraps


def _rope_class(cls: type) -> type | None:
    """The transformers attention class in ``cls``'s MRO (patched subclasses included) that applies HF Llama's RoPE."""
    return next((c for c in cls.__mro__ if c.__name__ in ROPE_ATTENTION_CLASSES), None)


class RotaryEmbeddingAttention:
    """Mixed in front of an attention class: its forward, with the module's ``apply_rotary_pos_emb`` running
    :func:`rotary_embedding` (the patch's wrapper reads the flag set here; a recompute under gradient checkpointing
    calls this forward again, so it sets the flag again)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo cannot trace a ContextVar; compiled, RoPE is the formula anyway
            return super().forward(*args, **kwargs)
        token = _ACTIVE.set(True)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)


def _dispatching(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not torch.compiler.is_compiling() and _ACTIVE.get():
            return rotary_embedding(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, _ORIGINAL_ATTR, original)
    return apply_rotary_pos_emb


def _computes_llama_rope(function: Callable) -> bool:
    """``function(q, k, cos, sin, unsqueeze_dim=1)`` exists with that signature and computes what the eager formula
    does (on generic cos and sin, halves unequal), so that the patch never replaces something else."""
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    if names != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return False
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 6, generator=generator), torch.randn(2, 1, 5, 6, generator=generator)
    cos, sin = torch.randn(2, 5, 6, generator=generator), torch.randn(2, 5, 6, generator=generator)
    try:
        with torch.no_grad():
            actual = function(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - anything else is simply not the function we replace
        return False
    expected = eager_rotary_embedding(q, k, cos, sin)
    return (isinstance(actual, tuple) and len(actual) == 2
            and all(isinstance(a, torch.Tensor) and torch.equal(a, e) for a, e in zip(actual, expected, strict=True)))


def _wrap_module_function(module: ModuleType) -> bool:
    """Replace ``module.apply_rotary_pos_emb`` by the flag-dispatching wrapper, once; False if it is not HF Llama's
    RoPE (then nothing changes)."""
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if hasattr(current, _ORIGINAL_ATTR):
        return True
    if not _computes_llama_rope(current):
        return False
    module.apply_rotary_pos_emb = _dispatching(current)
    return True


def patch_rope(model: nn.Module) -> int:
    """Make the HF Llama-style attention modules of ``model`` apply RoPE with :func:`rotary_embedding`, in place.

    Each attention module's class gains a forward that sets a context flag around the original forward (parameters,
    names and state dict unchanged), and the modeling module of the attention class gets, once, a wrapper for its
    ``apply_rotary_pos_emb`` that calls :func:`rotary_embedding` while the flag is set and the original function
    otherwise (kept as the wrapper's ``_lamelm_original`` and ``__wrapped__``). Other models of the same family in the
    process keep the original path. Idempotent; returns the number of attention modules now using it.
    """
    count = 0
    for module in model.modules():
        matched = _rope_class(type(module))
        if matched is None or not _wrap_module_function(sys.modules[matched.__module__]):
            continue
        if not isinstance(module, RotaryEmbeddingAttention):
            module.__class__ = mixed_in_class(RotaryEmbeddingAttention, type(module), "Rope")
        count += 1
    return count
