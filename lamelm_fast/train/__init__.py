"""The lean training loop: ``python -m lamelm_fast.train`` or ``train(TrainConfig(...))``."""

from lamelm_fast.train.config import ConfigError, TrainConfig
from lamelm_fast.train.faults import TrainingStopped
from lamelm_fast.train.loop import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingStopped", "train"]
