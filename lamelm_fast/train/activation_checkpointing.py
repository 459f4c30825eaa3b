"""Activation (gradient) checkpointing of the decoder layers, and what the recompute may skip.

``full`` is Hugging Face's behaviour: each decoder layer keeps only its input and re-runs its whole forward in
backward. ``keep_attention`` also keeps the attention op's own outputs (the attention output and its logsumexp,
which its backward needs anyway), so the recompute runs the projections, norms and MLP but not attention: the only
part of a layer whose cost grows with the square of the sequence. It costs one [tokens, heads x head_dim] tensor per
layer in the compute dtype.

How the attention op is caught: a Python dispatch mode sees an op and can keep its output (forward) or hand that
back instead of running it (recompute). torch's selective checkpointing enters its mode around the whole region,
so every op of the layer pays the mode's Python (measured on an H100, 1B QLoRA: the step 1.75x slower than
``full``). Here the checkpoint's contexts only say which mode is current; transformers' attention functions
(``ALL_ATTENTION_FUNCTIONS``, wrapped once per process by :func:`_catch_attention_in_functions`) enter it around
their own call, so only the few ops of the attention call pass through Python. Under ``torch.compile`` the region
is traced, not dispatched op by op: there torch's selective checkpointing, which dynamo understands, does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from functools import partial, wraps
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CHECKPOINTING_POLICIES = ("full", "keep_attention")

# The fused attention ops that sdpa and flash-attn dispatch to, by schema name: which of them exist depends on the
# torch build and on whether flash-attn is installed. sdpa's math fallback (an arbitrary mask on some builds, eager
# attention) is a chain of ordinary ops and is recomputed.
ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward",
    "torch_attn::_varlen_attn",  # torch's varlen flash attention, which packed batches run (ops/varlen_attention.py)
})

# The mode the attention functions run under: set by a keep_attention region (forward or recompute) of this thread.
_ATTENTION_MODE: ContextVar[_KeptAttention | None] = ContextVar("lamelm_attention_mode", default=None)


def _keep_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    schema = getattr(op, "_schema", None)
    if schema is not None and schema.name in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _KeptAttention(TorchDispatchMode):
    """The attention ops' outputs of one checkpointed region, in call order: ``recompute`` False keeps them as they
    run, True hands them back in the same order instead of running the ops."""

    def __init__(self, kept: list[Any], recompute: bool) -> None:
        super().__init__()
        self.kept, self.recompute, self.position = kept, recompute, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func._schema.name not in ATTENTION_OPS:
            return func(*args, **(kwargs or {}))
        if not self.recompute:
            out = func(*args, **(kwargs or {}))
            # Detached: the region's own tensors without the autograd graph, sharing the output's version counter
            # (ADInplaceOrView is what shares it, and beneath autograd it is excluded unless asked for), so an
            # in-place change of the output shows.
            leaves, spec = tree_flatten(out)
            with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
                leaves = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            self.kept.append((spec, leaves, [leaf._version if isinstance(leaf, torch.Tensor) else None
                                             for leaf in leaves]))
            return out
        if self.position >= len(self.kept):
            raise RuntimeError(f"keep_attention: the recompute of a checkpointed layer ran more attention ops "
                               f"({func._schema.name}) than its forward did; the layer's control flow depends on "
                               "state that changed. Use --gradient-checkpointing-policy full")
        spec, leaves, versions = self.kept[self.position]
        self.position += 1
        if any(v is not None and leaf._version != v for leaf, v in zip(leaves, versions, strict=True)):
            raise RuntimeError("keep_attention: an attention output kept for the recompute was modified in place "
                               "after the forward, so backward would use the wrong values. Use "
                               "--gradient-checkpointing-policy full, or make the code after the attention call out "
                               "of place")
        return tree_unflatten(leaves, spec)


class _AttentionRegion:
    """A checkpoint context (forward or recompute) that makes ``mode`` the attention functions' mode in its region,
    without entering it: the region's other ops dispatch as usual."""

    def __init__(self, mode: _KeptAttention) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        _catch_attention_in_functions()
        self.mode.position = 0  # a second backward (retain_graph) recomputes from the first kept output again
        self.token = _ATTENTION_MODE.set(self.mode)

    def __exit__(self, *exc: object) -> None:
        _ATTENTION_MODE.reset(self.token)


def _keep_attention_contexts() -> tuple[_AttentionRegion, _AttentionRegion]:
    kept: list[Any] = []
    return _AttentionRegion(_KeptAttention(kept, recompute=False)), _AttentionRegion(_KeptAttention(kept, True))


def _in_attention_mode(attention: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(attention)  # its attributes too: lamelm's varlen wrapper recognises itself through this one
    def attention_in_mode(*args: Any, **kwargs: Any) -> Any:
        mode = None if torch.compiler.is_compiling() else _ATTENTION_MODE.get()
        if mode is None:
            return attention(*args, **kwargs)
        token = _ATTENTION_MODE.set(None)  # an attention function that calls another enters the mode once
        try:
            with mode:
                return attention(*args, **kwargs)
        finally:
            _ATTENTION_MODE.reset(token)

    attention_in_mode.lamelm_attention_mode = attention  # type: ignore[attr-defined]
    return attention_in_mode


def _catch_attention_in_functions() -> None:
    """Wrap each of transformers' attention functions not wrapped yet (see the module docstring). Checked at every
    region, so functions registered or re-wrapped later (lamelm's varlen attention) are caught too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS):
        attention = ALL_ATTENTION_FUNCTIONS[name]
        if not hasattr(attention, "lamelm_attention_mode"):
            ALL_ATTENTION_FUNCTIONS[name] = _in_attention_mode(attention)


def checkpoint_kwargs(policy: str, compiled: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` under ``policy``; ``compiled``: the checkpointed
    function is compiled (torch's selective checkpointing, see the module docstring)."""
    if policy not in CHECKPOINTING_POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}; choose one of {', '.join(CHECKPOINTING_POLICIES)}")
    kwargs: dict[str, Any] = {"use_reentrant": False}  # non-reentrant: needed by the policy, and frozen inputs work
    if policy == "keep_attention":
        kwargs["context_fn"] = (partial(create_selective_checkpoint_contexts, _keep_attention_policy) if compiled
                                else _keep_attention_contexts)
    return kwargs


def enable_activation_checkpointing(model: nn.Module, policy: str, every_n_layers: int = 1,
                                    compiled: bool = False) -> None:
    """Checkpoint the decoder layers of a transformers model under ``policy``: every layer, or with
    ``every_n_layers`` = n the layers 0, n, 2n... (the others keep their activations: less recompute, more memory);
    ``compiled``: the layers will be compiled."""
    kwargs = checkpoint_kwargs(policy, compiled)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x, where gradient_checkpointing_enable is a deprecated alias
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
