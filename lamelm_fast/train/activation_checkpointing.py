"""Activation (gradient) checkpointing of the decoder layers, and what the recompute may skip.

``full`` is Hugging Face's behaviour: each decoder layer keeps only its input and re-runs its whole forward in
backward. ``keep_attention`` also keeps the attention op's own outputs (the attention output and its logsumexp,
which its backward needs anyway), so the recompute runs the projections, norms and MLP but not attention: the only
part of a layer whose cost grows with the square of the sequence. It costs one [tokens, heads x head_dim] tensor per
layer in the compute dtype; the selection is torch's selective activation checkpointing, which sees every op of the
recomputed region through a dispatch mode (some microseconds of host time per op). Measured on an H100 (1B QLoRA,
2k and 8k tokens per row), that host time made the step 1.75x slower than ``full``: only much longer rows, or a
step whose host time hides behind its device time, can gain from it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
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


def _keep_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    schema = getattr(op, "_schema", None)
    if schema is not None and schema.name in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` under ``policy``."""
    if policy not in CHECKPOINTING_POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}; choose one of {', '.join(CHECKPOINTING_POLICIES)}")
    kwargs: dict[str, Any] = {"use_reentrant": False}  # non-reentrant: needed by the policy, and frozen inputs work
    if policy == "keep_attention":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention_policy)
    return kwargs


def enable_activation_checkpointing(model: nn.Module, policy: str, every_n_layers: int = 1) -> None:
    """Checkpoint the decoder layers of a transformers model under ``policy``: every layer, or with
    ``every_n_layers`` = n the layers 0, n, 2n... (the others keep their activations: less recompute, more memory)."""
    kwargs = checkpoint_kwargs(policy)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x, where gradient_checkpointing_enable is a deprecated alias
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)

