"""lamelm-fast: a performance-first fine-tuning trainer for causal language models."""

__version__ = "0.1.0"
