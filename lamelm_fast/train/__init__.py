"""The lean training loop: ``python -m lamelm_fast.train`` or ``train(TrainConfig(...))``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamelm_fast.train.config import ConfigError, TrainConfig
    from lamelm_fast.train.faults import TrainingStopped
    from lamelm_fast.train.loop import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingStopped", "train"]
_MODULES = {"ConfigError": "config", "TrainConfig": "config", "TrainingStopped": "faults", "TrainResult": "loop",
            "train": "loop"}
# The package's modules, as `lamelm_fast.train.NAME` after `import lamelm_fast.train` (not __main__: it trains).
_SUBMODULES = ("activation_checkpointing", "checkpoint", "cli", "config", "data", "distributed", "faults", "hub",
               "loop", "model", "reporting", "samples")


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: `python -m lamelm_fast.train` imports the package before its
    # __main__, and only the command line's own code can turn a Ctrl-C during torch's import (~2 s) into one line.
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
