"""Model FLOPs per training token and model FLOPs utilisation (MFU).

The estimate follows the PaLM / torchtitan convention: each weight used in a matmul costs 2 FLOPs per token in the
forward pass, 2 more for the gradient of its input and 2 more for its own gradient, and attention adds
``12 * layers * heads * head_dim * seq_len`` per token (scores and weighted sum, forward and backward, counted over
the full square, without halving for the causal mask). Recomputation by gradient checkpointing is not counted, so
this is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn


def logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit one packs two per uint8 element, and its quant_state
    keeps the logical shape."""
    quant_state = getattr(param, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int, int]:
    """``(trainable, frozen, embedding)`` logical parameter counts, three disjoint groups summing to the total.

    ``embedding`` holds the weights used only as lookup tables: those of ``nn.Embedding`` modules that no other
    module also uses. A tied input embedding / LM head matrix is multiplied on every token by the head, so it counts
    as a matmul weight, in ``trainable`` or ``frozen`` by its ``requires_grad``. Shared parameters count once.
    """
    lookup_ids: set[int] = set()
    matmul_ids: set[int] = set()
    for module in model.modules():
        owned = {id(param) for param in module.parameters(recurse=False)}
        (lookup_ids if isinstance(module, nn.Embedding) else matmul_ids).update(owned)
    trainable = frozen = embedding = 0
    for param in model.parameters():  # yields a tied parameter once
        count = logical_numel(param)
        if id(param) in lookup_ids and id(param) not in matmul_ids:
            embedding += count
        elif param.requires_grad:
            trainable += count
        else:
            frozen += count
    return trainable, frozen, embedding


def flops_per_token(model_config: Any, trainable_params: int, frozen_params: int, embedding_params: int,
                    seq_len: float) -> float:
    """FLOPs of one training token (forward + backward).

    Takes the three counts exactly as :func:`count_parameters` returns them (``flops_per_token(config,
    *count_parameters(model), seq_len)``): ``trainable_params`` and ``frozen_params`` already exclude the
    lookup-only embeddings, which are counted in ``embedding_params`` and cost nothing (a gather, and for a trainable
    table a scatter-add of its gradient). Trainable weights cost 6 FLOPs per token, frozen ones 4 (no weight
    gradient, but the input gradient still flows through them to the adapters or earlier layers).

    ``seq_len`` is the length each token attends over, averaged over tokens: for sequences of lengths ``L_i``
    (packed or not) that is ``sum(L_i**2) / sum(L_i)``, which is ``L`` when every sequence has length ``L``.
    Layers, heads and head size come from the (text) config; the attention term uses query heads, so grouped-query
    attention costs the same here as multi-head attention.
    """
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * trainable_params + 4.0 * frozen_params + 12.0 * config.num_hidden_layers * heads * head_dim * seq_len


# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s with fp32 accumulation, from NVIDIA's
# datasheets and architecture whitepapers; fp16 for T4 and V100, which have no bf16. GeForce cards accumulate in
# fp32 at half their fp16-accumulate rate, and training accumulates in fp32, so their entries are the lower figure.
# Matched against the NVML/torch device name in this order, most specific first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "GH200": 989.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM5; NVML names it e.g. "NVIDIA H100 80GB HBM3"
    "A100": 312.0,
    # No NVIDIA datasheet covers the AWS-only A10G: 70 is the commonly quoted dense figure, approximate.
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "T4": 65.0,
    "V100S": 130.0,
    "V100-PCIE": 112.0,
    "V100": 125.0,  # SXM2
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "RTX 6000 Ada": 364.2,
    "RTX A6000": 154.8,
}


def _names(device_name: str, key: str) -> bool:
    # Whole-token match, so "L4" does not match "L40S", "A10" not "A100", "V100" not "Quadro GV100".
    return re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", device_name.lower()) is not None


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s (not TFLOP/s) of the named device; ``override_tflops`` (TFLOP/s) wins; unknown: None."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override_tflops}")
        return override_tflops * 1e12
    if device_name is None:
        return None
    tflops = next((value for key, value in PEAK_BF16_TFLOPS.items() if _names(device_name, key)), None)
    return None if tflops is None else tflops * 1e12


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of ``peak`` (FLOP/s); None when the peak is unknown."""
    return None if peak is None else tokens_per_second * flops_per_token / peak
