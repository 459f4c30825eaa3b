"""Public fused ops. Each dispatches to a CUDA extension, a Triton kernel or the torch reference."""

from lamelm_fast.ops.cross_entropy import LinearCrossEntropyLoss, fused_linear_cross_entropy
from lamelm_fast.ops.lora4bit import LoRALinear4bit, lora_nf4_linear

__all__ = ["LinearCrossEntropyLoss", "LoRALinear4bit", "fused_linear_cross_entropy", "lora_nf4_linear"]
