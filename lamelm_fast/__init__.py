"""lamelm-fast: a performance-first fine-tuning trainer for causal language models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamelm_fast.patching import apply_kernels

__version__ = "0.1.0"
__all__ = ["apply_kernels"]
# The package's modules, as `lamelm_fast.NAME` after `import lamelm_fast` (kernels: the repo's kernels/ folder, mapped
# here by pyproject's package-dir).
_SUBMODULES = ("assets", "cli_parser", "explain", "export", "integrations", "kernels", "metrics", "ops", "optim",
               "patching", "train")


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: `python -m lamelm_fast.train` imports this package before any code
    # of the command runs, and a Ctrl-C during torch's import (~2 s) could only end in a traceback.
    if name == "apply_kernels":
        from lamelm_fast.patching import apply_kernels

        return apply_kernels
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
