"""Optimizers and learning-rate schedules."""

from lamelm_fast.optim.adamw import FusedAdamW
from lamelm_fast.optim.schedules import LR_SCHEDULER_TYPES, get_lr_scheduler

__all__ = ["LR_SCHEDULER_TYPES", "FusedAdamW", "get_lr_scheduler"]
