"""QLoRA linear layers: a frozen 4-bit base (bitsandbytes storage, read as it is) plus a LoRA adapter, in one op.

``y = x @ dequant(W)^T + bias + s * (dropout(x) @ A^T) @ B^T`` with the hand-derived backward

    dx = dy @ dequant(W) + s * ((dy @ B) @ A) * dropout_mask / (1 - p)
    dA = s * (dy @ B)^T @ dropout(x)        dB = s * dy^T @ (dropout(x) @ A^T)        dbias = sum(dy)

saving only x, the [M, r] product ``dropout(x) @ A^T`` and, with dropout, a bool mask (autograd over PEFT also keeps
the dropped-out input in the adapter dtype and its own mask, per layer). The 4-bit weight is dequantized again in
backward instead of being kept. On CUDA (or ``LAMELM_KERNELS=triton``) the base matmul reads the 4-bit weight inside a
Triton GEMM with the LoRA term in its epilogue (``lamelm_fast.kernels.nf4_lora``), or, where that measures slower
(large row counts; ``LAMELM_NF4_MATMUL``, :mod:`lamelm_fast.ops.nf4_matmul`), dequantizes W into a transient buffer
and lets cuBLAS multiply onto the LoRA term; otherwise the torch reference dequantizes with our own code and
multiplies in the compute dtype, reproducing PEFT + bitsandbytes op for op.

Dtypes follow PEFT over bitsandbytes: the base matmul in the layer's ``compute_dtype`` (the autocast dtype under
autocast), the adapter in A's dtype (the autocast dtype under autocast), the result in x's dtype.

:func:`patch_peft_lora4bit` makes a PEFT model use this op in place; it also fuses a Llama-style MLP
(gate/up/SiLU/down: g and u are saved, ``silu(g) * u`` is recomputed in backward) and the q/k/v projections of an
attention block (one op over the shared input: one input-gradient buffer, accumulated by the kernel).

Under torch.compile the ops run as custom ops (``lamelm_fast::lora4bit_forward`` and ``_backward``, section
"torch.compile" below): no graph break, and dynamo never traces our Python or the Triton launches; the q/k/v
projections then run as three ops, since the group's pending outputs are Python state a graph cannot hold.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lamelm_fast.ops._patch import mixed_in_class
from lamelm_fast.ops.dispatch import (
    BACKENDS,
    NF4_MATMUL_STRATEGIES,
    active_autocast_dtype,
    requested_nf4_matmul,
    resolve_backend,
)
from lamelm_fast.ops.quant4bit import QUANT_TYPES, Packed4bit, Unsupported4bit, dequantize_reference
from lamelm_fast.ops.swiglu import SwiGLUMLP, is_silu, is_swiglu_mlp, swiglu_gradients, swiglu_values

__all__ = ["LoRALinear4bit", "lora_nf4_linear", "patch_peft_lora4bit", "reuse_adapter_casts"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- the math


@dataclass(frozen=True)
class _Spec:
    """Everything about one projection that is not a differentiable tensor."""

    weight: Packed4bit
    scale: float
    dropout: float  # the effective probability: 0 outside training
    compute_dtype: torch.dtype  # base matmul
    lora_dtype: torch.dtype  # adapter matmuls
    backend: str  # "triton" or "torch"
    matmul: str  # the Triton backend's 4-bit matmul strategy: "auto", "fused" or "dequant"
    adapted: bool = True  # False: a bare 4-bit projection (no adapter: A and B are None) inside a fused MLP


def _base_matmul(a: torch.Tensor, spec: _Spec, *, weight_transposed: bool, out_dtype: torch.dtype,
                 lora: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, casts: _Casts | None = None) -> torch.Tensor:
    """``a @ op(W) (+ bias) + scale * left @ right`` in ``out_dtype``, added into ``out`` when it is given;
    ``casts``: a's, shared with the other projections of a.

    Triton: one kernel, fp32 accumulation, one rounding (or dequantize + cuBLAS, per ``spec.matmul``). Torch: the
    base in the compute dtype and the LoRA term in its own dtype, each rounded to ``out_dtype`` and then added,
    exactly as PEFT + bitsandbytes do it.
    """
    if spec.backend == "triton":
        from lamelm_fast.ops import nf4_matmul

        if out is None:
            out = torch.empty(a.shape[0], spec.weight.shape[0 if weight_transposed else 1], dtype=out_dtype,
                              device=a.device)
            accumulate = False
        else:
            accumulate = True
        # a goes in uncast, its casts on request: the dequant strategy writes the cast into its GEMM operand.
        return nf4_matmul.matmul_4bit_lora(a, spec.weight, strategy=spec.matmul, dtype=spec.compute_dtype,
                                           weight_transposed=weight_transposed, lora=lora, scale=spec.scale,
                                           bias=bias, out=out, accumulate=accumulate, a_casts=casts)
    a = a.to(spec.compute_dtype)
    weight = dequantize_reference(spec.weight, spec.compute_dtype)
    if weight_transposed:
        result = F.linear(a, weight, None if bias is None else bias.to(spec.compute_dtype)).to(out_dtype)
    else:
        result = (a @ weight).to(out_dtype)
    del weight  # before the LoRA term is allocated: the CPU path keeps one dequantized weight at a time
    if lora is not None:
        result = result + (lora[0] @ lora[1] * spec.scale).to(out_dtype)
    if out is None:
        return result
    return out.add_(result)


def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Keep-mask of inverted dropout, drawn as ATen's CPU dropout draws it (bernoulli on a tensor like x), so CPU
    runs reproduce PEFT's ``nn.Dropout`` sample for sample."""
    if p == 0.0:
        return None
    return torch.empty_like(x).bernoulli_(1.0 - p).bool()


def _apply_dropout(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    if keep is None:
        return x
    return x * keep.to(x.dtype).div_(1.0 - p)


class _Casts:
    """A tensor in other dtypes, each cast made once: the projections that share an input (q/k/v, gate/up) share its
    casts to the adapter dtype (under autocast, one [tokens, hidden] fp32 -> bf16 pass instead of one per projection).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self._made = tensor, {}

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._made:
            self._made[dtype] = self.tensor.to(dtype)
        return self._made[dtype]


# (data_ptr, dtype, shape, strides, target dtype) -> (source tensor, its version, cast); None: no reuse
_adapter_casts: dict[tuple[Any, ...], tuple[torch.Tensor, int, torch.Tensor]] | None = None


@contextlib.contextmanager
def reuse_adapter_casts() -> Iterator[None]:
    """Within this block each adapter weight is cast to the adapter dtype once (QLoRA under autocast: fp32 A and B to
    bf16), not at every use. A training step uses them in the forward, the checkpointed recompute and the backward:
    five casts per projection become two (~340 launches fewer per step at Llama-3.2-1B's 112 projections).

    For one step's forwards and backwards, which do not change the weights: the optimizer step belongs outside. A
    weight changed in place inside is cast again (its version moved), except through ``.data`` or a raw pointer,
    which leave no trace. The casts are freed at the end (~2 bytes per adapter parameter meanwhile)."""
    global _adapter_casts
    outer = _adapter_casts
    if outer is None:
        _adapter_casts = {}
    try:
        yield
    finally:
        _adapter_casts = outer


def _adapter_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, made once per :func:`reuse_adapter_casts` block. Keyed by the bytes' address and layout,
    not the tensor object: backward sees the parameters as the detached aliases that autograd and checkpointing save.
    The entry holds the weight, so no other tensor can take its memory while the cast is reused."""
    cache = _adapter_casts
    if cache is None or weight.dtype == dtype:
        return weight.to(dtype)
    key = (weight.data_ptr(), weight.dtype, weight.shape, weight.stride(), dtype)
    entry = cache.get(key)
    if entry is not None and entry[1] == weight._version:
        return entry[2]
    cast = weight.to(dtype)
    cache[key] = (weight, weight._version, cast)
    return cast


def _project_forward(x: torch.Tensor, spec: _Spec, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, casts: _Casts | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One projection of 2-D x: (y, xa = dropout(x) @ A^T, dropout keep-mask or None); ``casts``: x's, shared."""
    casts = casts or _Casts(x)
    if not spec.adapted:
        return _base_matmul(x, spec, weight_transposed=True, out_dtype=out_dtype, bias=bias, casts=casts), None, None
    x_lora = casts.to(spec.lora_dtype)
    keep = _dropout_mask(x_lora, spec.dropout)
    xa = _apply_dropout(x_lora, keep, spec.dropout) @ _adapter_cast(A, spec.lora_dtype).t()
    right = _adapter_cast(B, spec.lora_dtype).t()
    y = _base_matmul(x, spec, weight_transposed=True, out_dtype=out_dtype, lora=(xa, right), bias=bias, casts=casts)
    return y, xa, keep


def _adapter_output_grads(grad: torch.Tensor, spec: _Spec, B: torch.Tensor, xa: torch.Tensor, need_gb: bool,
                          need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The adapter products that read the output gradient: ``gb = g @ B`` [M, r] in the adapter dtype and
    ``dB = s * g^T @ xa`` [out, r] in B's, with ``g = grad.to(adapter dtype)``; None where not needed.

    Triton, both needed: one kernel reads grad once and rounds it in registers (``kernels/lora_backward.py``); dB is
    scaled in it and rounded once from its fp32 sum, to B's dtype. Torch (and ranks over the kernel's maximum): the cast
    written out, then two matmuls, as PEFT does.
    """
    if spec.backend == "triton" and need_gb and need_b:
        from lamelm_fast.kernels import lora_backward

        if B.shape[1] <= lora_backward.MAX_RANK:
            if grad.shape[1] > 1 and grad.stride(1) != 1:
                grad = grad.contiguous()
            gb, grad_b = lora_backward.lora_output_grad(grad, B, xa, lora_dtype=spec.lora_dtype, scale=spec.scale)
            return gb, grad_b.to(B.dtype)
    grad_lora = grad.to(spec.lora_dtype)
    gb = grad_lora @ _adapter_cast(B, spec.lora_dtype) if need_gb else None
    grad_b = _scaled(grad_lora.t() @ xa, spec.scale, B.dtype) if need_b else None
    return gb, grad_b


def _scaled(product: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``product * scale`` in ``dtype``, the parameter's: one op where scaling and then casting would be two, and
    three with the cast autograd makes when a Function's gradient is not in its input's dtype (QLoRA: fp32 adapters,
    bf16 products). The multiply rounds to the product's dtype first, as the separate ops did."""
    if dtype == product.dtype:
        return product.mul_(scale)
    return torch.mul(product, scale, out=torch.empty(product.shape, dtype=dtype, device=product.device))


def _project_backward(grad: torch.Tensor, x: _Casts, x_dtype: torch.dtype, spec: _Spec, A: torch.Tensor,
                      B: torch.Tensor, xa: torch.Tensor, keep: torch.Tensor | None,
                      needs: tuple[bool, bool, bool, bool], dx: torch.Tensor | None,
                      dx_terms: list[tuple[Any, ...]] | None = None) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dA, dB, dbias) of one projection of an input of dtype ``x_dtype``, whose casts ``x`` holds
    (shared by the projections of one input); dx is added into ``dx`` when that is given. ``dx_terms`` (no dropout,
    the dequant strategy): dx's term is appended there instead, for one GEMM over the group's
    (:func:`_shared_backward`)."""
    need_x, need_a, need_b, need_bias = needs
    if not spec.adapted:
        if need_x and dx_terms is not None:
            dx_terms.append((grad, spec.weight, None, 0.0))
        elif need_x:
            dx = _base_matmul(grad, spec, weight_transposed=False, out_dtype=x_dtype, out=dx)
        return dx, None, None, grad.sum(0) if need_bias else None
    A_l = _adapter_cast(A, spec.lora_dtype)
    gb, grad_b = _adapter_output_grads(grad, spec, B, xa, need_x or need_a, need_b)
    if need_x:
        if dx_terms is not None:
            dx_terms.append((grad, spec.weight, (gb, A_l), spec.scale))
        elif keep is None:  # the LoRA term rides in the kernel's epilogue
            dx = _base_matmul(grad, spec, weight_transposed=False, out_dtype=x_dtype, lora=(gb, A_l), out=dx)
        else:
            dx = _base_matmul(grad, spec, weight_transposed=False, out_dtype=x_dtype, out=dx)
            dx += (_apply_dropout(gb @ A_l, keep, spec.dropout) * spec.scale).to(x_dtype)
    x_lora = x.to(spec.lora_dtype) if need_a else None
    grad_a = _scaled(gb.t() @ _apply_dropout(x_lora, keep, spec.dropout), spec.scale, A.dtype) if need_a else None
    grad_bias = grad.sum(0) if need_bias else None
    return dx, grad_a, grad_b, grad_bias


def _kept_dtype(x_dtype: torch.dtype, specs: tuple[_Spec, ...]) -> torch.dtype | None:
    """The dtype backward keeps the input in (x's own: x itself), None for nothing (bare 4-bit projections only:
    backward needs x's shape and dtype, kept on ctx). The adapters' dtype where that is narrower (QLoRA under
    autocast: x is fp32, the adapters bf16; backward reads x only through that cast, for dA)."""
    lora_dtypes = {spec.lora_dtype for spec in specs if spec.adapted}
    if not lora_dtypes:
        return None
    if len(lora_dtypes) == 1 and (dtype := lora_dtypes.pop()).itemsize < x_dtype.itemsize:
        return dtype
    return x_dtype


def _input_for_backward(x: torch.Tensor, casts: _Casts, specs: tuple[_Spec, ...]) -> torch.Tensor:
    """What backward keeps of the input (see :func:`_kept_dtype`): x, its cast, or an empty tensor."""
    dtype = _kept_dtype(x.dtype, specs)
    return x.new_empty(0) if dtype is None else casts.to(dtype)


def _shared_forward(x: torch.Tensor, specs: tuple[_Spec, ...], params: Sequence[torch.Tensor | None],
                    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]]:
    """Several projections of one input: their outputs, what backward keeps of the input (2-D) and each
    projection's (xa, dropout keep-mask)."""
    x2 = x.reshape(-1, x.shape[-1])
    outs, saved, casts = [], [], _Casts(x2)
    with torch.autocast(x.device.type, enabled=False):  # dtypes were decided by the caller
        for i, spec in enumerate(specs):
            A, B, bias = params[3 * i: 3 * i + 3]
            y, xa, keep = _project_forward(x2, spec, A, B, bias, x.dtype, casts)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            saved += [xa, keep]
    return outs, _input_for_backward(x2, casts, specs), saved


def _shared_backward(specs: tuple[_Spec, ...], x2: torch.Tensor, x_shape: Sequence[int], x_dtype: torch.dtype,
                     params: Sequence[torch.Tensor | None], saved: Sequence[torch.Tensor | None],
                     grads: Sequence[torch.Tensor | None], needs: Sequence[bool],
                     ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(dx, gradients of params) of :func:`_shared_forward`; ``needs``: whether x and each param need one."""
    dx, param_grads, casts = None, [], _Casts(x2)
    dx_terms = [] if needs[0] and _one_input_gradient_gemm(specs, saved, grads) else None
    with torch.autocast(x2.device.type, enabled=False):
        for i, (spec, grad) in enumerate(zip(specs, grads, strict=True)):
            A, B, bias = params[3 * i: 3 * i + 3]
            if grad is None:
                param_grads += [None, None, None]
                continue
            dx, *grads_i = _project_backward(grad.reshape(-1, grad.shape[-1]), casts, x_dtype, spec, A, B,
                                             saved[2 * i], saved[2 * i + 1], (needs[0], *needs[1 + 3 * i: 4 + 3 * i]),
                                             dx, dx_terms)
            param_grads += grads_i
        if dx_terms:
            from lamelm_fast.kernels import nf4_lora

            dx = torch.empty(dx_terms[0][0].shape[0], x_shape[-1], dtype=x_dtype, device=dx_terms[0][0].device)
            nf4_lora.dequant_matmul_4bit_lora_sum(dx_terms, dtype=specs[0].compute_dtype, out=dx)
    return (None if dx is None else dx.view(x_shape)), param_grads


def _one_input_gradient_gemm(specs: tuple[_Spec, ...], saved: Sequence[torch.Tensor | None],
                             grads: Sequence[torch.Tensor | None]) -> bool:
    """Whether the input gradients of these projections of one input (q/k/v) are summed by one GEMM
    (``nf4_lora.dequant_matmul_4bit_lora_sum``): two or more with an output gradient, all on the Triton backend's
    dequant strategy at this row count, in one compute dtype, without dropout (its mask multiplies the LoRA term on
    its own). One GEMM instead of three, and no half-precision product added into an fp32 dx per extra projection.
    """
    from lamelm_fast.ops.nf4_matmul import settled_strategy

    present = [i for i, grad in enumerate(grads) if grad is not None]
    if len(present) < 2 or len({spec.compute_dtype for spec in specs}) != 1:
        return False
    rows = grads[present[0]].numel() // grads[present[0]].shape[-1]
    return all(specs[i].backend == "triton" and settled_strategy(specs[i].matmul, rows) == "dequant"
               and saved[2 * i + 1] is None for i in present)


class _SharedInputLoRA4bit(torch.autograd.Function):
    """Several 4-bit LoRA projections of one input (one: a plain layer; three: q/k/v). Backward accumulates every
    projection's input gradient into one buffer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, specs: tuple[_Spec, ...], *params: torch.Tensor | None):
        outs, kept, saved = _shared_forward(x, specs, params)
        ctx.specs, ctx.x_shape, ctx.x_dtype = specs, x.shape, x.dtype
        ctx.save_for_backward(kept, *params, *saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        x2, *rest = ctx.saved_tensors
        n = len(ctx.specs)
        dx, param_grads = _shared_backward(ctx.specs, x2, ctx.x_shape, ctx.x_dtype, rest[: 3 * n], rest[3 * n:],
                                           grads, (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:]))
        return dx, None, *param_grads


def _mlp_inner_dtype(x_dtype: torch.dtype, gate: _Spec) -> torch.dtype:
    """The dtype of the fused MLP's own tensors (g, u, h and their gradients).

    x's dtype, as PEFT + bitsandbytes return it, except on the Triton path when the compute dtype is narrower (QLoRA
    after prepare_model_for_kbit_training: fp32 activations, bf16 compute): there g, u and h are kept in the compute
    dtype. PEFT rounds the base product to it too before upcasting, and h and the gradients are rounded to it anyway
    before the next matmul reads them, so only the traffic changes: half the bytes over [tokens, intermediate] at
    every pass (forward, recompute, backward) and half the saved g and u. The torch reference keeps PEFT's dtypes.
    """
    narrower = gate.compute_dtype.itemsize < x_dtype.itemsize
    return gate.compute_dtype if gate.backend == "triton" and narrower else x_dtype


def _mlp_forward(x: torch.Tensor, specs: tuple[_Spec, ...], params: Sequence[torch.Tensor | None],
                 ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]]:
    """``down(silu(gate(x)) * up(x))``: [its output], what backward keeps of x (2-D), and g, u and each
    projection's (xa, dropout keep-mask)."""
    gate, up, down = specs
    x2 = x.reshape(-1, x.shape[-1])
    inner = _mlp_inner_dtype(x.dtype, gate)
    with torch.autocast(x.device.type, enabled=False):
        casts = _Casts(x2)
        g, xa_g, keep_g = _project_forward(x2, gate, *params[0:3], inner, casts)
        u, xa_u, keep_u = _project_forward(x2, up, *params[3:6], inner, casts)
        kept = _input_for_backward(x2, casts, (gate, up))
        del casts
        y, xa_d, keep_d = _project_forward(swiglu_values(g, u, down.backend), down, *params[6:9], x.dtype)
    return [y.view(*x.shape[:-1], y.shape[-1])], kept, [g, u, xa_g, keep_g, xa_u, keep_u, xa_d, keep_d]


def _mlp_backward(specs: tuple[_Spec, ...], x2: torch.Tensor, x_shape: Sequence[int], x_dtype: torch.dtype,
                  params: Sequence[torch.Tensor | None], saved: Sequence[torch.Tensor | None],
                  grads: Sequence[torch.Tensor | None], needs: Sequence[bool],
                  ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(dx, gradients of params) of :func:`_mlp_forward`, recomputing ``silu(g) * u``; ``needs`` as
    :func:`_shared_backward`'s."""
    g, u, xa_g, keep_g, xa_u, keep_u, xa_d, keep_d = saved
    (grad_y,) = grads
    gate, up, down = specs
    with torch.autocast(x2.device.type, enabled=False):
        h = swiglu_values(g, u, down.backend)
        dh, *down_grads = _project_backward(grad_y.reshape(-1, grad_y.shape[-1]), _Casts(h), h.dtype, down,
                                            *params[6:8], xa_d, keep_d, (True, *needs[7:10]), None)
        del h
        dg, du = swiglu_gradients(dh, g, u, down.backend, overwrite_grad=True)  # dh is ours: dg goes over it
        del dh
        casts = _Casts(x2)
        dx, *gate_grads = _project_backward(dg, casts, x_dtype, gate, *params[0:2], xa_g, keep_g,
                                            (needs[0], *needs[1:4]), None)
        dx, *up_grads = _project_backward(du, casts, x_dtype, up, *params[3:5], xa_u, keep_u,
                                          (needs[0], *needs[4:7]), dx)
    return (None if dx is None else dx.view(x_shape)), [*gate_grads, *up_grads, *down_grads]


class _LoRA4bitSwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with three 4-bit LoRA projections; saves x, g, u and the [M, r] adapter
    products, and recomputes ``silu(g) * u`` in backward (autograd would keep silu(g), and h for down's adapter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, specs: tuple[_Spec, _Spec, _Spec], *params: torch.Tensor | None):
        (y,), kept, (g, u, *adapters) = _mlp_forward(x, specs, params)
        ctx.specs, ctx.x_shape, ctx.x_dtype = specs, x.shape, x.dtype
        ctx.save_for_backward(kept, g, u, *params, *adapters)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x2, g, u, *rest = ctx.saved_tensors
        dx, param_grads = _mlp_backward(ctx.specs, x2, ctx.x_shape, ctx.x_dtype, rest[:9], [g, u, *rest[9:]],
                                        [grad_y], (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:]))
        return dx, None, *param_grads


# --------------------------------------------------------------------------------------------------- torch.compile

# Under torch.compile the two ops above run as custom ops: opaque to dynamo, so that what runs (our Python, the Triton
# launches) is what runs in eager, and what backward keeps is what the autograd Functions keep. Traced instead, AOT
# autograd re-decides what to save (on CPU it kept every weight's unpacked 4-bit codes: twice the packed weight) and
# dynamo would trace into the Triton launches. The specs travel as integers and floats (a custom op takes no objects).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS_PER_SPEC = 11


def _encode(specs: tuple[_Spec, ...], params: Sequence[torch.Tensor | None],
            ) -> tuple[list[int], list[float], list[torch.Tensor], list[torch.Tensor]]:
    """The specs and params as the custom ops take them: integers, floats, the 4-bit weights' tensors and the params
    that are not None (a list of tensors holds no None where autograd should see its members)."""
    ints, floats, weights = [], [], []
    for i, spec in enumerate(specs):
        w = spec.weight
        ints += [*w.shape, w.blocksize, w.nested_blocksize, QUANT_TYPES.index(w.quant_type),
                 _DTYPES.index(spec.compute_dtype), _DTYPES.index(spec.lora_dtype), BACKENDS.index(spec.backend),
                 NF4_MATMUL_STRATEGIES.index(spec.matmul), int(spec.adapted), int(params[3 * i + 2] is not None)]
        floats += [spec.scale, spec.dropout]
        weights += [w.data, w.absmax, *((w.nested_absmax, w.nested_code, w.nested_offset) if w.nested else ())]
    return ints, floats, weights, [p for p in params if p is not None]


def _decode(ints: Sequence[int], floats: Sequence[float], weights: Sequence[torch.Tensor],
            params: Sequence[torch.Tensor]) -> tuple[tuple[_Spec, ...], list[torch.Tensor | None]]:
    """:func:`_encode`'s inverse: the specs and the params with their Nones (A, B and bias per projection)."""
    specs, full, tensors, present = [], [], iter(weights), iter(params)
    for i in range(len(floats) // 2):
        out, in_, blocksize, nested_blocksize, quant, compute, lora, backend, matmul, adapted, bias = \
            ints[_INTS_PER_SPEC * i: _INTS_PER_SPEC * (i + 1)]
        data, absmax = next(tensors), next(tensors)
        nested = [next(tensors) for _ in range(3)] if nested_blocksize else [None] * 3  # 0: not nested (from_bnb)
        weight = Packed4bit(data, (out, in_), QUANT_TYPES[quant], blocksize, absmax, *nested, nested_blocksize)
        specs.append(_Spec(weight, floats[2 * i], floats[2 * i + 1], _DTYPES[compute], _DTYPES[lora],
                           BACKENDS[backend], NF4_MATMUL_STRATEGIES[matmul], bool(adapted)))
        full += [next(present) if adapted else None, next(present) if adapted else None,
                 next(present) if bias else None]
    return tuple(specs), full


def _kept_specs(mlp: bool, specs: tuple[_Spec, ...]) -> tuple[_Spec, ...]:
    return specs[:2] if mlp else specs  # the MLP keeps its input for gate and up


def _saved_present(mlp: bool, specs: tuple[_Spec, ...]) -> list[bool]:
    """Which of the forward's saved tensors exist (g and u; xa for an adapter, its keep-mask with dropout)."""
    adapters = [flag for spec in specs for flag in (spec.adapted, spec.dropout > 0)]
    return [True, True, *adapters] if mlp else adapters


# Seeded (its LoRA dropout draws from torch's generator): a recompute under activation checkpointing replays the
# forward's random state, as eager checkpointing does, instead of drawing other masks.
@torch.library.custom_op("lamelm_fast::lora4bit_forward", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,),
                         schema="(bool mlp, int[] ints, float[] floats, Tensor[] weights, Tensor x, Tensor[] params) "
                                "-> Tensor[]")
def _forward_op(mlp: bool, ints: list[int], floats: list[float], weights: list[torch.Tensor], x: torch.Tensor,
                params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs, what backward keeps of x, and the saved tensors; empty tensors stand for None and for x itself
    (an op may not return its input: setup_context keeps it)."""
    specs, full = _decode(ints, floats, weights, params)
    outs, kept, saved = (_mlp_forward if mlp else _shared_forward)(x, specs, full)
    if _kept_dtype(x.dtype, _kept_specs(mlp, specs)) == x.dtype:
        kept = x.new_empty(0)
    return [*outs, kept, *(x.new_empty(0) if t is None else t for t in saved)]  # (returns may not alias)


@_forward_op.register_fake
def _(mlp: bool, ints: list[int], floats: list[float], weights: list[torch.Tensor], x: torch.Tensor,
      params: list[torch.Tensor]) -> list[torch.Tensor]:
    specs, full = _decode(ints, floats, weights, params)
    rows, width = math.prod(x.shape[:-1]), x.shape[-1]

    def adapter(spec: _Spec, A: torch.Tensor | None, in_features: int) -> list[torch.Tensor]:
        return [x.new_empty(rows, A.shape[0], dtype=spec.lora_dtype) if spec.adapted else None,
                x.new_empty(rows, in_features, dtype=torch.bool) if spec.dropout > 0 else None]

    if mlp:
        gate, up, down = specs
        inner = _mlp_inner_dtype(x.dtype, gate)
        outs = [x.new_empty(*x.shape[:-1], down.weight.shape[0])]
        saved = [x.new_empty(rows, gate.weight.shape[0], dtype=inner),
                 x.new_empty(rows, up.weight.shape[0], dtype=inner), *adapter(gate, full[0], width),
                 *adapter(up, full[3], width),
                 *adapter(down, full[6], gate.weight.shape[0])]
    else:
        outs = [x.new_empty(*x.shape[:-1], spec.weight.shape[0]) for spec in specs]
        saved = [t for i, spec in enumerate(specs) for t in adapter(spec, full[3 * i], width)]
    kept_dtype = _kept_dtype(x.dtype, _kept_specs(mlp, specs))
    kept = x.new_empty(rows, width, dtype=kept_dtype) if kept_dtype not in (None, x.dtype) else x.new_empty(0)
    return [*outs, kept, *(x.new_empty(0) if t is None else t for t in saved)]


@torch.library.custom_op("lamelm_fast::lora4bit_backward", mutates_args=(),
                         schema="(bool mlp, int[] ints, float[] floats, Tensor[] weights, Tensor kept, "
                                "SymInt[] x_shape, ScalarType x_dtype, Tensor[] params, Tensor[] saved, "
                                "Tensor?[] grads, bool[] needs) -> Tensor[]")
def _backward_op(mlp: bool, ints: list[int], floats: list[float], weights: list[torch.Tensor],
                 kept: torch.Tensor, x_shape: list[int], x_dtype: torch.dtype, params: list[torch.Tensor],
                 saved: list[torch.Tensor], grads: list[torch.Tensor | None], needs: list[bool]) -> list[torch.Tensor]:
    """dx and the gradients of ``params``, in their dtypes (autograd casts a Function's gradients to them anyway);
    empty tensors where ``needs`` says none is wanted."""
    specs, full = _decode(ints, floats, weights, params)
    saved = [t if present else None for t, present in zip(saved, _saved_present(mlp, specs), strict=True)]
    x2 = kept.reshape(-1, x_shape[-1])
    dx, param_grads = (_mlp_backward if mlp else _shared_backward)(specs, x2, x_shape, x_dtype, full, saved, grads,
                                                                   needs)
    if needs[0] and dx is None:  # no output had a gradient
        dx = kept.new_zeros(x_shape, dtype=x_dtype)
    param_grads = [(torch.zeros_like(p) if g is None else g.to(p.dtype)) if need else None
                   for g, p, need in zip(param_grads, full, needs[1:], strict=True) if p is not None]
    return [kept.new_empty(0) if g is None else g for g in (dx if needs[0] else None, *param_grads)]


@_backward_op.register_fake
def _(mlp: bool, ints: list[int], floats: list[float], weights: list[torch.Tensor], kept: torch.Tensor,
      x_shape: list[int], x_dtype: torch.dtype, params: list[torch.Tensor], saved: list[torch.Tensor],
      grads: list[torch.Tensor | None], needs: list[bool]) -> list[torch.Tensor]:
    _, full = _decode(ints, floats, weights, params)
    param_needs = [need for p, need in zip(full, needs[1:], strict=True) if p is not None]
    return [kept.new_empty(x_shape, dtype=x_dtype) if needs[0] else kept.new_empty(0),
            *(p.new_empty(p.shape) if need else kept.new_empty(0) for p, need in zip(params, param_needs, strict=True))]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[torch.Tensor]) -> None:
    mlp, ints, floats, weights, x, params = inputs
    specs, full = _decode(ints, floats, weights, params)
    n_outs = 1 if mlp else len(specs)
    kept = x if _kept_dtype(x.dtype, _kept_specs(mlp, specs)) == x.dtype else output[n_outs]
    ctx.save_for_backward(kept, *weights, *params, *output[n_outs + 1:])
    ctx.op = (mlp, ints, floats, len(weights), len(params), n_outs, list(x.shape), x.dtype)
    ctx.needs = [x.requires_grad, *(p is not None and p.requires_grad for p in full)]
    ctx.set_materialize_grads(False)  # no zeros for the saved tensors, which nothing differentiates


def _op_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple[Any, ...]:
    mlp, ints, floats, n_weights, n_params, n_outs, x_shape, x_dtype = ctx.op
    kept, *rest = ctx.saved_tensors
    weights, params, saved = rest[:n_weights], rest[n_weights: n_weights + n_params], rest[n_weights + n_params:]
    dx, *param_grads = _backward_op(mlp, ints, floats, weights, kept, x_shape, x_dtype, params, saved,
                                    list(grads[:n_outs]), ctx.needs)
    present_needs = [p.requires_grad for p in params]
    return (None, None, None, [None] * n_weights, dx if ctx.needs[0] else None,
            [g if need else None for g, need in zip(param_grads, present_needs, strict=True)])


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def _run_op(mlp: bool, x: torch.Tensor, specs: tuple[_Spec, ...], params: Sequence[torch.Tensor | None],
            ) -> list[torch.Tensor]:
    ints, floats, weights, present = _encode(specs, params)
    return _forward_op(mlp, ints, floats, weights, x, present)[: 1 if mlp else len(specs)]


def _shared_op(x: torch.Tensor, specs: tuple[_Spec, ...], params: Sequence[torch.Tensor | None],
               ) -> tuple[torch.Tensor, ...]:
    """:class:`_SharedInputLoRA4bit`'s outputs; the custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return tuple(_run_op(False, x, specs, params))
    return _SharedInputLoRA4bit.apply(x, specs, *params)


def _mlp_op(x: torch.Tensor, specs: tuple[_Spec, ...], params: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """:class:`_LoRA4bitSwiGLU`'s output; the custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return _run_op(True, x, specs, params)[0]
    return _LoRA4bitSwiGLU.apply(x, specs, *params)


# --------------------------------------------------------------------------------------------------- public op


def _spec(weight: Packed4bit, x: torch.Tensor, lora_weight: torch.Tensor, scale: float, dropout: float,
          compute_dtype: torch.dtype | None) -> _Spec:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    autocast = active_autocast_dtype(x.device)
    if autocast is not None:
        compute = lora = autocast
    else:
        compute, lora = compute_dtype or x.dtype, lora_weight.dtype
    # Both settings are read (and checked) per call and kept in the spec, so the backward runs as the forward did.
    return _Spec(weight, float(scale), float(dropout), compute, lora, resolve_backend(x.device),
                 requested_nf4_matmul())


def _check_inputs(x: torch.Tensor, weight: Packed4bit, A: torch.Tensor, B: torch.Tensor,
                  bias: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices of :func:`lora_nf4_linear`'s tensors, with errors that name the argument.

    Needed because the Triton kernels take sizes from the 4-bit weight and trust the other tensors to match (a wrong
    B or bias is read out of bounds), and the torch path's raw matmul errors do not say which argument is wrong.
    Attribute reads only: no device sync, nothing next to the kernels' cost.
    """
    out_features, in_features = weight.shape
    if not x.is_floating_point():
        raise TypeError(f"lora_nf4_linear: x has dtype {x.dtype}; it must be floating point (e.g. x.float() or "
                        "x.to(torch.bfloat16)): token ids go through an embedding first")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"lora_nf4_linear: x has shape {list(x.shape)}; its last dimension must be in_features = "
                         f"{in_features} (the 4-bit weight is [{out_features}, {in_features}])")
    if A.dim() != 2 or A.shape[1] != in_features:
        raise ValueError(f"lora_nf4_linear: A has shape {list(A.shape)}, expected [r, {in_features}] "
                         "([r, in_features]: PEFT's lora_A.weight)")
    rank = A.shape[0]
    if B.shape != (out_features, rank):
        raise ValueError(f"lora_nf4_linear: B has shape {list(B.shape)}, expected [{out_features}, {rank}] "
                         f"([out_features, r] with out_features from the 4-bit weight and r from A {list(A.shape)}: "
                         "PEFT's lora_B.weight of the same adapter as A)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"lora_nf4_linear: bias has shape {list(bias.shape)}, expected [{out_features}] "
                         "([out_features]) or None")
    for name, tensor in (("A", A), ("B", B), ("bias", bias)):
        if tensor is not None and not tensor.is_floating_point():
            raise TypeError(f"lora_nf4_linear: {name} has dtype {tensor.dtype}; it must be floating point")
    for name, tensor in (("quant_weight", weight.data), ("A", A), ("B", B), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"lora_nf4_linear: {name} is on {tensor.device} but x is on {x.device}: move the layer "
                             "(or x) so that all of them are on one device")


def lora_nf4_linear(x: torch.Tensor, quant_weight: torch.Tensor, quant_state: Any, A: torch.Tensor,
                    B: torch.Tensor, scale: float, *, bias: torch.Tensor | None = None, dropout: float = 0.0,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ dequant(W)^T + bias + scale * (dropout(x) @ A^T) @ B^T``, differentiable in x, A, B and bias.

    ``quant_weight`` / ``quant_state``: a bitsandbytes ``Params4bit`` and its ``QuantState`` (nf4 or fp4, nested or
    not, any blocksize), read in place. ``A`` [r, in], ``B`` [out, r] (PEFT's ``lora_A/lora_B.weight``).
    ``dropout``: probability on the adapter's input (pass 0 outside training). ``compute_dtype``: the base
    matmul's dtype (bitsandbytes' ``compute_dtype``; default x's dtype). Returns x's dtype.
    """
    weight = Packed4bit.of(quant_weight, quant_state)
    _check_inputs(x, weight, A, B, bias)
    spec = _spec(weight, x, A, scale, dropout, compute_dtype)
    (y,) = _shared_op(x, (spec,), (A, B, bias))
    return y


def _bnb_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit would compute in for this x (its set_compute_type rule)."""
    if not getattr(base, "compute_type_is_set", True) and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    return getattr(base, "compute_dtype", None) or x.dtype


def _check_base_layer(base_layer: nn.Module) -> None:
    """A quantized bitsandbytes ``Linear4bit``, or an error that says what to pass instead (a dense layer otherwise
    fails later on a missing ``quant_state`` attribute)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        Linear4bit = None
    if Linear4bit is None or not isinstance(base_layer, Linear4bit):
        raise TypeError(f"LoRALinear4bit needs a bitsandbytes Linear4bit base layer, got "
                        f"{type(base_layer).__module__}.{type(base_layer).__qualname__}: "
                        "for a dense nn.Linear use LoRALinear4bit.from_linear(linear, r), which quantizes it")
    if getattr(base_layer.weight, "quant_state", None) is None:
        raise ValueError("LoRALinear4bit: the base Linear4bit's weight is not quantized yet; bitsandbytes quantizes "
                         "it when the layer is moved to its device (base_layer.to(device)): move it first, or build "
                         "from the dense layer with LoRALinear4bit.from_linear(linear, r)")


class LoRALinear4bit(nn.Module):
    """A frozen 4-bit linear layer (a bitsandbytes ``Linear4bit``, storage untouched) plus a LoRA adapter.

    ``forward(x) = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, computed by :func:`lora_nf4_linear`.
    Parameter names match PEFT's layer up to its adapter-name level (``lora_A.weight`` vs ``lora_A.default.weight``).
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float | None = None, lora_dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {lora_dropout}")
        _check_base_layer(base_layer)
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        # bitsandbytes would otherwise repack the weight into its CPU inference layout on an eval forward.
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False
        out_features, in_features = base_layer.weight.quant_state.shape
        device = base_layer.weight.device
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=lora_dtype)  # kaiming-uniform
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=lora_dtype)
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts as a no-op
        alpha = r if lora_alpha is None else lora_alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = lora_dropout

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float | None = None, lora_dropout: float = 0.0, *,
                    quant_type: str = "nf4", compress_statistics: bool = True, blocksize: int = 64,
                    compute_dtype: torch.dtype | None = None, use_rslora: bool = False) -> LoRALinear4bit:
        """Quantize a dense layer with bitsandbytes (on the layer's device) and put a fresh adapter on it."""
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                                 quant_type=quant_type)
        base.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, blocksize=blocksize,
                                        compress_statistics=compress_statistics, quant_type=quant_type, module=base)
        if linear.bias is not None:
            base.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
        base = base.to(linear.weight.device)  # bitsandbytes quantizes on the move
        return cls(base, r, lora_alpha, lora_dropout, use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        return lora_nf4_linear(x, weight, weight.quant_state, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               bias=self.base_layer.bias, dropout=self.lora_dropout if self.training else 0.0,
                               compute_dtype=_bnb_compute_dtype(self.base_layer, x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}")


# --------------------------------------------------------------------------------------------------- PEFT patching


def _peft_lora_classes() -> tuple[type, ...]:
    """PEFT's LoRA linear layers that may sit on a 4-bit base: its bitsandbytes one and its plain one."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support
        return (Linear,)
    return Linear4bit, Linear


def _adapter_problem(layer: nn.Module) -> str | None:
    """Why this PEFT layer cannot run fused right now (None: it can). Checked at every call."""
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "the adapter is merged into the base weight"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (fused: exactly one)"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return "DoRA or another LoRA variant"
    if not isinstance(layer.lora_A[name], nn.Linear) or not isinstance(layer.lora_B[name], nn.Linear):
        return "adapter modules are not plain nn.Linear"
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)) or (isinstance(dropout, nn.Dropout) and dropout.p >= 1):
        return f"LoRA dropout module {dropout!r}"
    return None


def _layer_spec(layer: nn.Module, x: torch.Tensor) -> tuple[_Spec, tuple[torch.Tensor, ...]] | None:
    """The fused op's spec and tensors for this PEFT layer, or None when PEFT must run it."""
    if _adapter_problem(layer) is not None:
        return None
    name = next(n for n in layer.active_adapters if n in layer.lora_A)
    base = layer.get_base_layer()
    try:
        weight = Packed4bit.of(base.weight, base.weight.quant_state)
    except Unsupported4bit:
        return None
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    spec = _spec(weight, x, A, layer.scaling[name], p, _bnb_compute_dtype(base, x))
    return spec, (A, B, base.bias)


class _FusedPeftLoRA4bit:
    """Mixed in front of PEFT's LoRA linear class: same module, parameters and state dict; forward runs
    :func:`lora_nf4_linear` when the layer's state allows it, PEFT's own forward otherwise."""

    _lamelm_qkv: _QKVGroup | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:  # adapter_names and other per-call options: PEFT's business
            return super().forward(x, *args, **kwargs)
        group = self._lamelm_qkv
        if group is not None:
            out = group.forward(self, x)
            if out is not None:
                return out
        fused = _layer_spec(self, x)
        if fused is None:
            return super().forward(x)
        spec, params = fused
        (y,) = _shared_op(x, (spec,), params)
        return y




class _QKVGroup:
    """The q, k and v projections of one attention module. The call on the first one computes all three in one
    op over the shared input; the next calls with the same input tensor take their output from it. What is pending
    is each thread's own (threads running one model, DataParallel's replicas); a call that does not find its input's
    outputs pending computes alone."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members = list(members)
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"members": self.members}  # (nothing pending survives a copy)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"])

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling():  # dynamo follows neither thread-local state nor version counters
            return None
        local = self._local
        index = next((i for i, member in enumerate(self.members) if member is layer), None)
        if index is None:  # a replica of a member (DataParallel): not this group's module
            return None
        if index:
            held, version, pending = getattr(local, "pending", None) or (None, -1, {})
            if held is not x or version != x._version or index not in pending:
                return None
            out = pending.pop(index)
            if not pending:
                local.pending = None
            return out
        local.pending = None
        if x.is_inference():  # no version counter to tell a reused input from one changed in place: run them apart
            return None
        fused = [_projection_spec(member, x) for member in self.members]
        if any(f is None for f in fused) or len({f[0].backend for f in fused}) != 1:
            return None
        first, *rest = _SharedInputLoRA4bit.apply(x, tuple(f[0] for f in fused), *(t for f in fused for t in f[1]))
        local.pending = (x, x._version, dict(enumerate(rest, start=1)))  # the input, its version, its outputs
        return first


def _bare_spec(base: nn.Module, x: torch.Tensor) -> tuple[_Spec, tuple[None, None, torch.Tensor | None]] | None:
    """A bitsandbytes ``Linear4bit`` without an adapter as the fused MLP runs it: bitsandbytes' own dtypes (its
    compute dtype, x's dtype out; autocast does not reach into its matmul), no LoRA term."""
    try:
        weight = Packed4bit.of(base.weight, base.weight.quant_state)
    except Unsupported4bit:
        return None
    compute = _bnb_compute_dtype(base, x)
    return (_Spec(weight, 0.0, 0.0, compute, compute, resolve_backend(x.device), requested_nf4_matmul(), adapted=False),
            (None, None, base.bias))


def _projection_spec(module: nn.Module, x: torch.Tensor) -> tuple[_Spec, tuple[Any, ...]] | None:
    return _layer_spec(module, x) if isinstance(module, _FusedPeftLoRA4bit) else _bare_spec(module, x)


class _GroupedBare4bit:
    """Mixed in front of a bare bitsandbytes ``Linear4bit`` among q/k/v projections whose others have adapters
    (``--lora-target-modules q_proj,v_proj``, PEFT's default for Llama): it takes its output from the group's one op
    over the shared input, or runs bitsandbytes' forward."""

    _lamelm_qkv: _QKVGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._lamelm_qkv.forward(self, x) if self._lamelm_qkv is not None else None
        return super().forward(x) if out is None else out


class _FusedSwiGLUMLP(SwiGLUMLP):
    """Mixed in front of a Llama-style MLP whose three projections are 4-bit, patched PEFT LoRA layers or bare
    bitsandbytes ones (--lora-target-modules left them out): one op for the whole MLP (g and u in the compute dtype,
    not the fp32 that bitsandbytes hands back), or, when a projection cannot run fused at this call, the
    projections around the fused SwiGLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = [_projection_spec(proj, x) for proj in (self.gate_proj, self.up_proj, self.down_proj)]
        if not is_silu(self.act_fn) or any(f is None for f in fused) or len({f[0].backend for f in fused}) != 1:
            return super().forward(x)
        return _mlp_op(x, tuple(f[0] for f in fused), [t for f in fused for t in f[1]])


def _static_problem_4bit(base: nn.Module) -> str | None:
    try:
        Packed4bit.of(base.weight, base.weight.quant_state)
    except Unsupported4bit as error:
        return str(error)
    return None


def _static_problem(layer: nn.Module) -> str | None:
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    return _static_problem_4bit(layer.get_base_layer()) or _adapter_problem(layer)


def _bare_members(projections: list[Any], linear4bit: type) -> list[nn.Module] | None:
    """The bare 4-bit layers among ``projections`` of one op, when each projection is a patched LoRA layer or a bare
    4-bit layer we read (those are then kept in bitsandbytes' standard layout); else None (no one op)."""
    bare = [p for p in projections if type(p) is linear4bit]
    if not all(isinstance(p, _FusedPeftLoRA4bit) or p in bare for p in projections):
        return None
    if any(_static_problem_4bit(p) is not None for p in bare):
        return None
    for projection in bare:
        projection.support_avx512bf16_for_cpu = False  # keep bitsandbytes' standard layout
    return bare


def patch_peft_lora4bit(model: nn.Module, notes: list[str] | None = None) -> int:
    """Make every PEFT LoRA linear layer over a bitsandbytes ``Linear4bit`` in ``model`` run our fused op.

    In place: the PEFT modules, their parameters and state dict stay as they are (their class gains a forward), so
    ``get_peft_model_state_dict``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work unchanged. A patched
    layer checks at every call that it can run fused (one active plain-LoRA adapter, not merged, adapters enabled,
    no per-call options) and otherwise runs PEFT's forward. Layers that cannot run fused now (DoRA, several active
    adapters, a layout or dtype we do not read) are left alone and logged with the reason. Llama-style MLPs
    (Llama, Mistral, Qwen2/3) whose three projections are 4-bit (patched, or bare where the targets left them out)
    run as one fused SwiGLU op, and the q/k/v projections of one attention module as one op over their shared
    input (bare 4-bit ones among them too). A model without PEFT LoRA layers is left as it is.

    Idempotent. Returns the number of layers that now run fused (including ones patched before); the layers left
    to PEFT, and why, are logged and appended to ``notes``.
    """
    peft_classes = _peft_lora_classes()
    if not peft_classes or importlib.util.find_spec("bitsandbytes") is None:
        return 0
    import bitsandbytes as bnb

    fused, skipped = 0, {}
    for name, module in model.named_modules():
        if not isinstance(module, peft_classes) or not isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            continue
        if not isinstance(module, _FusedPeftLoRA4bit):
            problem = _static_problem(module)
            if problem is not None:
                skipped[name] = problem
                continue
            module.get_base_layer().support_avx512bf16_for_cpu = False  # keep bitsandbytes' standard layout
            module.__class__ = mixed_in_class(_FusedPeftLoRA4bit, type(module), "Fused")
        fused += 1
    for module in model.modules() if fused else ():  # (a model without PEFT layers is not ours to change)
        mlp = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if (is_swiglu_mlp(module) and not isinstance(module, _FusedSwiGLUMLP)
                and _bare_members(mlp, bnb.nn.Linear4bit) is not None):
            module.__class__ = mixed_in_class(_FusedSwiGLUMLP, type(module), "Fused")
        qkv = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if (any(isinstance(p, _FusedPeftLoRA4bit) for p in qkv) and getattr(qkv[0], "_lamelm_qkv", None) is None
                and (bare := _bare_members(qkv, bnb.nn.Linear4bit)) is not None):
            group = _QKVGroup(qkv)
            for projection in bare:
                projection.__class__ = mixed_in_class(_GroupedBare4bit, type(projection), "Grouped")
            for projection in qkv:
                projection._lamelm_qkv = group
    if skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        message = f"{len(skipped)} 4-bit LoRA layer(s) left to PEFT: {reasons}"
        logger.warning(message)
        if notes is not None:
            notes.append(message)
    return fused
