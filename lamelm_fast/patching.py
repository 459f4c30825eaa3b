"""``apply_kernels(model)``: route a Hugging Face (or PEFT-wrapped) causal LM through lamelm-fast's fused ops.

- ``cross_entropy``: in training (``model.training`` and grad enabled, labels given) the causal-LM forward computes
  its loss with ``fused_linear_cross_entropy`` on the decoder's hidden states, so the [tokens, vocab] logits never
  exist; ``num_items_in_batch`` and ``shift_labels`` keep HF's meaning, Gemma's final logit softcap is applied.
  The training output carries ``logits=None``. Evaluation and generation run the model's own forward unchanged.
- ``lora``: PEFT LoRA layers over bitsandbytes 4-bit layers run the fused NF4 LoRA matmuls
  (:func:`lamelm_fast.ops.lora4bit.patch_peft_lora4bit`); adapter names and state dicts are untouched.
- ``swiglu``: Llama-style MLPs (Llama, Mistral, Qwen2/3) compute ``silu(gate) * up`` with the fused SwiGLU
  (:func:`lamelm_fast.ops.swiglu.patch_swiglu`), in training and evaluation alike: same values, fewer passes, and
  silu(gate) is not kept for backward.
- ``rms_norm``: the RMSNorm modules of Llama, Mistral/Mixtral, Qwen2/3 and Gemma 1/2/3 run the fused RMSNorm
  (:func:`lamelm_fast.ops.rms_norm.patch_rms_norm`) with the model's own numerics.
- ``rope``: the attention modules of Llama, Mistral, Qwen2/3 and Gemma 1/2/3 apply the rotary embedding with the
  fused kernel (:func:`lamelm_fast.ops.rope.patch_rope`; other models in the process keep transformers' function).

``torch.compile`` over a patched model (or ``TrainingArguments(torch_compile=True)``) gives one graph for the model
and one graph break, at the fused loss, which runs in eager; RMSNorm, SwiGLU and RoPE are traced as their formulas and
fused by inductor, the 4-bit LoRA ops are custom ops. Compiled and eager agree (tests/test_torch_compile.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lamelm_fast.ops import fused_linear_cross_entropy
from lamelm_fast.ops._patch import mixed_in_class
from lamelm_fast.ops.dispatch import active_autocast_dtype
from lamelm_fast.ops.rms_norm import patch_rms_norm
from lamelm_fast.ops.rope import patch_rope
from lamelm_fast.ops.swiglu import patch_swiglu

# Causal-LM families whose head is a plain ``lm_head(hidden)`` (plus Gemma's softcap): the loss can be taken from
# the decoder's last hidden state with nothing lost. Others (logit scaling, MoE auxiliary losses...) are refused.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
IGNORE_INDEX = -100


@dataclass
class KernelReport:
    """What :func:`apply_kernels` changed: ``cross_entropy`` is True when the loss is fused; ``lora_layers`` counts
    the LoRA layers swapped for the fused NF4 path, ``swiglu_mlps`` the MLPs on the fused SwiGLU, ``rms_norms`` the
    fused norms, ``rope_attentions`` the attention modules on the fused RoPE; ``varlen_attention`` is True when sdpa
    can run packed batches as varlen flash attention; ``notes`` say what was left alone and why."""

    cross_entropy: bool = False
    lora_layers: int = 0
    swiglu_mlps: int = 0
    rms_norms: int = 0
    rope_attentions: int = 0
    varlen_attention: bool = False
    notes: list[str] = field(default_factory=list)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model: nn.Module) -> Any:
    """The transformers config of the model's text part; None for a module that is not a transformers model."""
    config = getattr(causal_lm(model), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def final_logit_softcap(model: nn.Module) -> float | None:
    """The softcap the model's own forward applies to its logits (Gemma 2, Gemma 3 text): read from the causal LM's
    own config, as its forward does; Gemma 3's multimodal class has none there and applies none."""
    return getattr(causal_lm(model).config, "final_logit_softcapping", None)


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection as a plain ``nn.Linear``; refuses adapted or quantized heads by name."""
    head = causal_lm(model).get_output_embeddings()
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        raise ValueError(
            f"the LM head is a {kind}, not a plain torch.nn.Linear (a LoRA adapter, modules_to_save or quantization "
            "on lm_head), which the fused cross-entropy cannot read without dropping it: keep lm_head out of LoRA "
            "target_modules and quantization, or call apply_kernels(model, cross_entropy=False)")
    return head


@torch.compiler.disable  # the op is opaque to torch.compile: break the graph once, here, not in every frame down to it
def lm_head_loss(
    head: nn.Linear,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items: int | torch.Tensor | None = None,
    softcap: float | None = None,
    return_accuracy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``head(hidden)`` against already shifted ``labels`` (-100 = ignored), fused.

    Sum over target tokens divided by ``num_items`` when given, else the mean. Under autocast the matmuls run in
    the autocast dtype as ``head(hidden)`` would; otherwise in the head weight's dtype.
    """
    dtype = active_autocast_dtype(hidden.device) or head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]).to(dtype), head.weight.to(dtype), labels.reshape(-1),
            bias=bias, reduction="sum" if num_items is not None else "mean", num_items=num_items, softcap=softcap,
            return_accuracy=return_accuracy)


def _as_keywords(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``forward``'s positional arguments named by its signature (labels may be among them)."""
    bound = inspect.signature(forward).bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        is_var_keyword = bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
        named.update(value if is_var_keyword else {name: value})
    return named


# The keyword argument that carries a list through the causal LM's forward (its **kwargs reach the decoder's) to the
# decoder, which appends its last hidden state to it: no hook and no state on a module, so torch.compile traces the
# whole forward and threads never see each other's hidden states.
_HIDDEN_STATES_SINK = "lamelm_last_hidden_state"


class _HiddenStatesSink:
    """Mixed in front of the decoder's class: a call given a list as ``_HIDDEN_STATES_SINK`` appends its last hidden
    state to it; every call is the decoder's own forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sink = kwargs.pop(_HIDDEN_STATES_SINK, None)
        outputs = super().forward(*args, **kwargs)
        if sink is not None:
            sink.append(outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0])
        return outputs


class _FusedLossCausalLM:
    """Mixed in front of a ``*ForCausalLM`` class: the training loss from the decoder's hidden states, fused (see the
    module docstring); every other call is the model's own forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        original = super().forward
        if args:
            kwargs = _as_keywords(original, args, kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None or not (self.training and torch.is_grad_enabled()):
            return original(labels=labels, **kwargs)
        captured: list[torch.Tensor] = []
        # The head runs on one position only (its logits are dropped); the loss reads the full hidden states.
        outputs = original(**{**kwargs, "labels": None, "logits_to_keep": 1, _HIDDEN_STATES_SINK: captured})
        if not captured:
            raise RuntimeError(f"apply_kernels: {type(self).__name__}'s forward did not pass its keyword arguments "
                               "to its decoder, so the fused cross-entropy cannot read the hidden states; call "
                               "apply_kernels(model, cross_entropy=False)")
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        loss = lm_head_loss(lm_head(self), captured[-1], shift_labels.to(captured[-1].device),
                            num_items=kwargs.get("num_items_in_batch"),
                            softcap=final_logit_softcap(self))
        if isinstance(outputs, tuple):  # return_dict=False: (logits, ...) becomes (loss, ...)
            return (loss, *outputs[1:])
        # Rebuilt rather than assigned: a ModelOutput only exposes as items the fields set when it was built.
        values = {f.name: getattr(outputs, f.name) for f in dataclasses.fields(outputs)}
        return type(outputs)(**{**values, "loss": loss, "logits": None})


def patch_cross_entropy(model: nn.Module) -> None:
    """Make the causal-LM forward compute its training loss with the fused linear cross-entropy (idempotent)."""
    target = causal_lm(model)
    model_type = getattr(text_config(model), "model_type", None)
    if model_type is None:
        raise ValueError(f"apply_kernels: {type(target).__name__} is not a transformers causal LM (no config with a "
                         "model_type), so its loss cannot be found; call apply_kernels(model, cross_entropy=False) to "
                         "patch its other layers only")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"apply_kernels: model type {model_type!r} is not supported by the fused cross-entropy "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); call apply_kernels(model, "
                         "cross_entropy=False) to keep the model's own loss")
    lm_head(model)  # refuse an adapted head now, not at the first training step
    decoder = target.get_decoder()
    if not isinstance(decoder, _HiddenStatesSink):
        decoder.__class__ = mixed_in_class(_HiddenStatesSink, type(decoder), "Sink")
    if not isinstance(target, _FusedLossCausalLM):
        # As the model's own class to the outside: save_pretrained writes its name into config.json's architectures
        # (vLLM and others read it), PEFT records its module, HF's Trainer keeps the dataset columns its forward names.
        target.__class__ = mixed_in_class(_FusedLossCausalLM, type(target), "", as_base=True)


def apply_kernels(model: nn.Module, cross_entropy: bool = True, lora: bool = True, swiglu: bool = True,
                  rms_norm: bool = True, rope: bool = True, varlen_attention: bool = True) -> KernelReport:
    """Swap the model's loss, PEFT 4-bit LoRA layers, MLP activations, norms and rotary embeddings for lamelm-fast's
    fused ops, in place; ``varlen_attention`` lets sdpa run packed batches (given transformers' padding-free
    arguments) as varlen flash attention, see :mod:`lamelm_fast.ops.varlen_attention`."""
    report = KernelReport()
    if varlen_attention:
        from lamelm_fast.ops.varlen_attention import mark_padding_free_forwards, patch_varlen_attention

        report.varlen_attention = patch_varlen_attention()
        if getattr(text_config(model), "model_type", None) in SUPPORTED_MODEL_TYPES:
            mark_padding_free_forwards(causal_lm(model).get_decoder())
        if not report.varlen_attention:
            report.notes.append("this torch has no varlen flash attention (torch >= 2.10): packed batches use sdpa "
                                "over a block-diagonal mask")
    if cross_entropy:
        patch_cross_entropy(model)
        report.cross_entropy = True
    if lora:
        from lamelm_fast.ops.lora4bit import patch_peft_lora4bit

        noted = len(report.notes)
        report.lora_layers = patch_peft_lora4bit(model, report.notes)
        if report.lora_layers == 0 and len(report.notes) == noted:
            report.notes.append("no PEFT LoRA layer over a bitsandbytes 4-bit base: nothing to swap")
    layers = ((swiglu, "swiglu_mlps", patch_swiglu, "no Llama-style MLP with a SiLU activation: SwiGLU left as it is"),
              (rms_norm, "rms_norms", patch_rms_norm, "no RMSNorm of a supported family: norms left as they are"),
              (rope, "rope_attentions", patch_rope,
               "no Llama-style attention with transformers' rotary embedding: RoPE left as it is"))
    for wanted, counter, patch, nothing_found in layers:
        if wanted:
            setattr(report, counter, patch(model))
            if getattr(report, counter) == 0:
                report.notes.append(nothing_found)
    return report
