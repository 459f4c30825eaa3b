"""Learning-rate schedules with the same names and values as ``transformers.get_scheduler``.

Every schedule is a ``LambdaLR`` multiplier of each group's initial LR. ``step`` is the scheduler's step
count (0 at construction, +1 per ``scheduler.step()``). Warmup is linear from 0 over
``num_warmup_steps`` steps, except for ``constant``, which ignores warmup (as in transformers).
The multipliers are functools.partial objects of module-level functions so schedulers stay picklable.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
_POLYNOMIAL_LR_END = 1e-7


def _warmup(step: int, num_warmup_steps: int) -> float:
    return float(step) / float(max(1, num_warmup_steps))


def _decay_progress(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """Fraction of the post-warmup phase done: 0 at the end of warmup, 1 at ``num_training_steps``."""
    return float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, num_warmup_steps: int) -> float:
    return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def _linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    # Half a cosine period over the decay phase; like transformers it rises again past the end.
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _decay_progress(step, num_warmup_steps, num_training_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _cosine_with_restarts(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    # One hard-restart cycle (transformers' default num_cycles=1), then 0 from the end of training on.
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _decay_progress(step, num_warmup_steps, num_training_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def _polynomial(step: int, *, num_warmup_steps: int, num_training_steps: int, lr_init: float) -> float:
    # Decays the default LR `lr_init` to _POLYNOMIAL_LR_END with power 1 (transformers' defaults);
    # returned as a multiplier because LambdaLR scales it by each group's initial LR.
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    if step > num_training_steps:
        return _POLYNOMIAL_LR_END / lr_init
    # max(1, ...): transformers divides by zero here when warmup == total; we return the peak LR instead.
    pct_remaining = 1 - (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return ((lr_init - _POLYNOMIAL_LR_END) * pct_remaining + _POLYNOMIAL_LR_END) / lr_init


def _inverse_sqrt(step: int, *, num_warmup_steps: int, timescale: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return 1.0 / math.sqrt((step + timescale - num_warmup_steps) / timescale)


def get_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int
) -> LambdaLR:
    """The ``LambdaLR`` that ``transformers.get_scheduler`` returns for the same arguments."""
    warmup_and_total = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps}
    lr_lambda: Callable[[int], float]
    if name == "linear":
        lr_lambda = partial(_linear, **warmup_and_total)
    elif name == "cosine":
        lr_lambda = partial(_cosine, **warmup_and_total)
    elif name == "cosine_with_restarts":
        lr_lambda = partial(_cosine_with_restarts, **warmup_and_total)
    elif name == "polynomial":
        # Like transformers, decay from the optimizer's default LR, not each group's.
        lr_init = optimizer.defaults["lr"]
        if not lr_init > _POLYNOMIAL_LR_END:
            raise ValueError(f"lr_end ({_POLYNOMIAL_LR_END}) must be smaller than initial lr ({lr_init})")
        lr_lambda = partial(_polynomial, **warmup_and_total, lr_init=lr_init)
    elif name == "constant":
        lr_lambda = _constant
    elif name == "constant_with_warmup":
        lr_lambda = partial(_constant_with_warmup, num_warmup_steps=num_warmup_steps)
    elif name == "inverse_sqrt":
        # transformers' default timescale: the warmup length, or 10k steps without warmup.
        timescale = num_warmup_steps or 10_000
        lr_lambda = partial(_inverse_sqrt, num_warmup_steps=num_warmup_steps, timescale=timescale)
    else:
        raise ValueError(f"Unknown LR scheduler {name!r}; valid names: {', '.join(LR_SCHEDULER_TYPES)}")
    return LambdaLR(optimizer, lr_lambda)
