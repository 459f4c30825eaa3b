"""lamelm-fast: a performance-first fine-tuning trainer for causal language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamelm_fast.patching import apply_kernels

__version__ = "0.1.0"
__all__ = ["apply_kernels"]


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: `python -m lamelm_fast.train` imports this package before any code
    # of the command runs, and a Ctrl-C during torch's import (~2 s) could only end in a traceback.
    if name == "apply_kernels":
        from lamelm_fast.patching import apply_kernels

        return apply_kernels
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
