"""Public fused ops. Each dispatches to a CUDA extension, a Triton kernel or the torch reference."""

from lamelm_fast.ops.cross_entropy import LinearCrossEntropyLoss, fused_linear_cross_entropy

__all__ = ["LinearCrossEntropyLoss", "fused_linear_cross_entropy"]
