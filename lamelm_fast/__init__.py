"""lamelm-fast: a performance-first fine-tuning trainer for causal language models."""

from lamelm_fast.patching import apply_kernels

__version__ = "0.1.0"
__all__ = ["apply_kernels"]
