"""LR schedules against transformers.get_scheduler, value for value."""

import math

import pytest
import torch
from transformers import get_scheduler

from lamelm_fast.optim import LR_SCHEDULER_TYPES, get_lr_scheduler

# (num_warmup_steps, num_training_steps): no warmup, warmup, warmup == total, odd sizes.
STEP_COMBOS = [(0, 10), (3, 10), (10, 10), (0, 1), (7, 37)]


def make_optimizer() -> torch.optim.Optimizer:
    # Two groups with different LRs: schedules scale each group's initial LR.
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 3e-4}], lr=2e-3)


def lr_trajectory(scheduler: torch.optim.lr_scheduler.LRScheduler, num_steps: int) -> list[list[float]]:
    lrs = [scheduler.get_last_lr()]
    for _ in range(num_steps):
        scheduler.optimizer.step()  # no grads: a no-op that keeps torch's call-order warning quiet
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    return lrs


def assert_lrs_equal(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert all(math.isclose(g, w, rel_tol=1e-12, abs_tol=0.0) for g, w in zip(got, want, strict=True)), (
            f"step {step}: {got} != {want}"
        )


@pytest.mark.parametrize("name", LR_SCHEDULER_TYPES)
@pytest.mark.parametrize(("num_warmup_steps", "num_training_steps"), STEP_COMBOS)
def test_matches_transformers(name: str, num_warmup_steps: int, num_training_steps: int) -> None:
    num_steps = num_training_steps + 2
    ours = get_lr_scheduler(name, make_optimizer(), num_warmup_steps, num_training_steps)
    actual = lr_trajectory(ours, num_steps)

    theirs = get_scheduler(name, make_optimizer(), num_warmup_steps, num_training_steps)
    if name == "polynomial" and num_warmup_steps == num_training_steps:
        # transformers divides by zero (num_training_steps - num_warmup_steps) once warmup ends; we give
        # the peak LR there and lr_end after it. Compare everything before that step.
        with pytest.raises(ZeroDivisionError):
            lr_trajectory(theirs, num_steps)
        theirs = get_scheduler(name, make_optimizer(), num_warmup_steps, num_training_steps)
        assert_lrs_equal(actual[:num_training_steps], lr_trajectory(theirs, num_training_steps - 1))
        assert actual[num_training_steps] == ours.base_lrs
        assert actual[-1] == pytest.approx([1e-7 / 2e-3 * lr for lr in ours.base_lrs], rel=1e-12)
        return
    assert_lrs_equal(actual, lr_trajectory(theirs, num_steps))


def test_schedule_shapes() -> None:
    """Spot checks that do not depend on transformers: warmup is linear from 0, linear decays to 0."""
    lrs = [group[0] for group in lr_trajectory(get_lr_scheduler("linear", make_optimizer(), 4, 8), 9)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1.5e-3, 2e-3, 1.5e-3, 1e-3, 5e-4, 0.0, 0.0], rel=1e-12)
    constant = lr_trajectory(get_lr_scheduler("constant", make_optimizer(), 4, 8), 3)
    assert constant == [[2e-3, 3e-4]] * 4  # warmup is ignored, as in transformers


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names: linear, cosine") as info:
        get_lr_scheduler("cosine_with_min_lr_typo", make_optimizer(), 0, 10)
    assert all(name in str(info.value) for name in LR_SCHEDULER_TYPES)


def test_scheduler_types() -> None:
    assert isinstance(LR_SCHEDULER_TYPES, tuple)
    assert set(LR_SCHEDULER_TYPES) == {
        "linear",
        "cosine",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
    }
