"""Health checks: each planted failure gives exactly its warning at its step; a healthy run gives none."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from lamelm_fast.metrics.health import HealthMonitor, HealthThresholds, HealthWarning

LOGGING_STEPS = 10
LR = 1e-4


def train_row(index: int, loss: float | None = None, grad_norm: float | None = 1.0, lr: float | None = LR,
              gpu_util: float | None = None, input_share: float | None = None) -> dict[str, Any]:
    """Window `index` (0-based) of a steady run: loss falling 1% a window, so neither flat nor rising."""
    return {"step": (index + 1) * LOGGING_STEPS, "loss": 3.0 * 0.99**index if loss is None else loss,
            "grad_norm": grad_norm, "learning_rate": lr, "epoch": index / 50, "token_accuracy": 0.3,
            "tokens_per_second": 4000.0, "gpu_util": gpu_util, "input_share": input_share}


def feed(monitor: HealthMonitor, rows: list[dict[str, Any]]) -> list[HealthWarning]:
    issued = []
    for row in rows:
        issued += monitor.on_train_row(row)
    assert issued == monitor.warnings  # what on_train_row returns is exactly what is recorded
    return issued


def fired(warnings: list[HealthWarning]) -> list[tuple[str, int]]:
    return [(warning.check, warning.step) for warning in warnings]


def cosine_lr(step: int, total: int, warmup: int, peak: float = 2e-4) -> float:
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("seed", range(5))
def test_healthy_run_gives_no_warning(seed: int) -> None:
    # 100 windows of 10 steps: loss 8.3 (ln 4096, random init) decaying exponentially to 4.58 with small
    # noise, warmup then cosine LR, grad norms of a few units early (one 5.0) settling to 0.5..1, evals falling.
    rng = random.Random(seed)
    total, warmup, windows = 1000, 30, 100
    monitor = HealthMonitor(early_stopping_patience=3)
    for index in range(windows):
        step = (index + 1) * LOGGING_STEPS
        loss = (4.35 + 3.95 * math.exp(-index / 35)) * (1 + rng.uniform(-0.0025, 0.0025))
        grad_norm = 5.0 if index == 1 else 0.5 + 2.5 * math.exp(-index / 10) + rng.uniform(0.0, 0.5)
        lr = cosine_lr(step, total, warmup)
        row = {"step": step, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "epoch": step / 867,
               "token_accuracy": 0.2, "tokens_per_second": 4200.0, "gpu_util": None}
        assert monitor.on_train_row(row, expected_lr=lr) == []
        if step % 100 == 0:
            eval_row = {"step": step, "val_loss": loss + 0.1, "val_perplexity": math.exp(loss + 0.1),
                        "val_token_accuracy": 0.2}
            assert monitor.on_eval_row(eval_row) == []
            assert monitor.best_eval == eval_row
    assert monitor.warnings == []
    assert not monitor.should_stop


def test_exploding_gradient_norm_above_maximum() -> None:
    monitor = HealthMonitor()
    rows = [train_row(i, grad_norm=40.0 if i in (10, 11) else 1.0) for i in range(20)]
    warnings = feed(monitor, rows)
    assert fired(warnings) == [("exploding_gradients", 120)]  # the second high window in a row
    assert "40" in warnings[0].message and "--max-grad-norm" in warnings[0].message
    assert "--learning-rate" in warnings[0].message and not warnings[0].fatal


def test_a_fresh_models_large_first_gradients_are_not_an_explosion() -> None:
    """--logging-steps 1 on a model trained from scratch: norms of ~12 in steps 1-3 while the loss falls fast."""
    rows = [{**train_row(i, grad_norm=12.0 if i < 3 else 1.0), "step": i + 1} for i in range(20)]
    assert feed(HealthMonitor(), rows) == []
    late = [{**train_row(i, grad_norm=12.0 if i in (14, 15) else 1.0), "step": i + 1} for i in range(20)]
    assert fired(feed(HealthMonitor(), late)) == [("exploding_gradients", 16)]


def test_one_clipped_spike_is_not_an_explosion() -> None:
    # As in the embedded default's real run: one window at 13.4 among norms of about 1, then back.
    assert feed(HealthMonitor(), [train_row(i, grad_norm=13.4 if i == 10 else 1.0) for i in range(20)]) == []


def test_exploding_gradient_norm_jump_below_maximum() -> None:
    # 3.0 is a fine absolute norm, but 15x the recent median of 0.2 is a blow-up in progress.
    monitor = HealthMonitor()
    rows = [train_row(i, grad_norm=3.0 if i in (8, 9) else 0.2) for i in range(12)]
    warnings = feed(monitor, rows)
    assert fired(warnings) == [("exploding_gradients", 100)]
    assert "15.0x" in warnings[0].message and "0.2" in warnings[0].message
    # Twice the median is not a jump.
    assert feed(HealthMonitor(), [train_row(i, grad_norm=0.4 if i in (8, 9) else 0.2) for i in range(12)]) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_is_fatal(bad: float) -> None:
    monitor = HealthMonitor()
    rows = [train_row(i, loss=bad if i == 6 else None, grad_norm=math.nan if i == 6 else 1.0) for i in range(7)]
    warnings = feed(monitor, rows)
    assert fired(warnings) == [("nonfinite_loss", 70)]
    assert warnings[0].fatal
    message = warnings[0].message
    assert "step 70" in message and str(bad) in message and "checkpoint" in message and "--learning-rate" in message


def test_zero_learning_rate_is_not_learning() -> None:
    monitor = HealthMonitor()
    warnings = feed(monitor, [train_row(i, loss=8.3, lr=0.0) for i in range(12)])
    assert fired(warnings) == [("not_learning", 50)]
    assert "learning rate has been 0 for 5" in warnings[0].message


def test_zero_learning_rate_fires_even_when_batch_noise_hides_the_flat_loss() -> None:
    losses = [8.3, 8.1, 8.4, 8.2, 8.35, 8.15, 8.3]  # 3.6% range: not flat, not rising three times in a row
    warnings = feed(HealthMonitor(), [train_row(i, loss=loss, lr=0.0) for i, loss in enumerate(losses)])
    assert fired(warnings) == [("not_learning", 50)]


def test_flat_loss_with_a_tiny_constant_learning_rate_is_not_learning() -> None:
    warnings = feed(HealthMonitor(), [train_row(i, loss=5.0 + 0.001 * (i % 2), lr=1e-9) for i in range(8)])
    assert fired(warnings) == [("not_learning", 50)]
    assert "5.001" in warnings[0].message and "1.000e-09" in warnings[0].message
    assert "every label masked" in warnings[0].message


def _decay_then_flat(flat_from: int, windows: int = 40) -> list[dict[str, Any]]:
    """Cosine LR over the run; the loss falls 2% a window until `flat_from`, then stays put."""
    rows = []
    for i in range(windows):
        loss = 6.0 * 0.98 ** min(i, flat_from)
        lr = LR * 0.5 * (1 + math.cos(math.pi * (i + 1) / windows))
        rows.append(train_row(i, loss=loss, lr=lr))
    return rows


def test_flat_loss_at_the_tail_of_a_decayed_schedule_is_not_a_warning() -> None:
    # From window 32 the cosine LR is below 10% of its peak: a flat loss there is the schedule ending.
    assert feed(HealthMonitor(), _decay_then_flat(flat_from=32)) == []


def test_flat_loss_while_the_schedule_is_still_high_is_a_warning() -> None:
    warnings = feed(HealthMonitor(), _decay_then_flat(flat_from=10))
    # The loss at window 10 equals the loss of windows 11..14: flat over five windows ending at step 150.
    assert fired(warnings) == [("not_learning", 150)]


def test_flat_loss_during_warmup_is_not_a_warning() -> None:
    assert feed(HealthMonitor(), [train_row(i, loss=8.3, lr=LR * (i + 1) / 10) for i in range(10)]) == []


def test_rising_loss() -> None:
    losses = [3.0, 2.9, 2.8, 2.7, 2.8, 2.9, 3.05, 3.2, 3.3]
    warnings = feed(HealthMonitor(), [train_row(i, loss=loss) for i, loss in enumerate(losses)])
    # Rises at windows 4, 5 and 6: the third in a row is at step 70; the run keeps rising, still one warning.
    assert fired(warnings) == [("loss_rising", 70)]
    assert "2.7" in warnings[0].message and "3.05" in warnings[0].message and "warmup" in warnings[0].message


def test_three_rises_within_the_batch_noise_are_not_a_trend() -> None:
    # The embedded default's real run, steps 110-210: windows swing by +-0.2 and three rises in a row add up to
    # 0.35, under 4 standard deviations of that noise.
    losses = [5.8655, 5.6847, 5.8489, 5.4301, 5.5169, 5.5368, 5.4640, 5.3166, 5.4041, 5.4689, 5.6665]
    assert feed(HealthMonitor(), [train_row(i, loss=loss) for i, loss in enumerate(losses)]) == []


def test_small_rises_are_noise() -> None:
    losses = [3.0, 2.9, 2.8, 2.7, 2.72, 2.74, 2.76, 2.78, 2.6]  # rises of 0.7%, under the 1% guard
    assert feed(HealthMonitor(), [train_row(i, loss=loss) for i, loss in enumerate(losses)]) == []


def _train_then_eval(monitor: HealthMonitor, val_losses: list[float], train_slope: float = -0.1
                     ) -> list[HealthWarning]:
    """Five train windows then one eval, per val loss; the train loss moves by `train_slope` a window."""
    issued = []
    for eval_index, val_loss in enumerate(val_losses):
        for i in range(eval_index * 5, eval_index * 5 + 5):
            issued += monitor.on_train_row(train_row(i, loss=4.0 + train_slope * i))
        row = {"step": (eval_index + 1) * 5 * LOGGING_STEPS, "val_loss": val_loss,
               "val_perplexity": math.exp(val_loss), "val_token_accuracy": 0.3}
        issued += monitor.on_eval_row(row)
    return issued


def test_overfitting_and_early_stopping() -> None:
    monitor = HealthMonitor(early_stopping_patience=2)
    warnings = _train_then_eval(monitor, [2.5, 2.2, 2.3])
    assert warnings == [] and not monitor.should_stop  # one rise, one eval without improvement
    warnings = _train_then_eval(monitor, [2.5, 2.2, 2.3, 2.45])
    assert fired(monitor.warnings) == [("overfitting", 200)]
    message = monitor.warnings[0].message
    assert "2.45" in message and "2.2 at step 100" in message
    assert "--early-stopping-patience" not in message  # it is on: this run stops by itself
    assert monitor.should_stop
    assert monitor.best_eval == {"step": 100, "val_loss": 2.2, "val_perplexity": math.exp(2.2),
                                 "val_token_accuracy": 0.3}


def test_overfitting_without_early_stopping_suggests_it() -> None:
    monitor = HealthMonitor()
    _train_then_eval(monitor, [2.5, 2.2, 2.3, 2.45])
    assert fired(monitor.warnings) == [("overfitting", 200)]
    assert "or use --early-stopping-patience" in monitor.warnings[0].message and not monitor.should_stop


def test_val_loss_rising_with_train_loss_rising_is_not_overfitting() -> None:
    # The train loss rises under 1% a window: below the rising-loss guard, and not the overfitting pattern.
    monitor = HealthMonitor(early_stopping_patience=5)
    assert _train_then_eval(monitor, [2.5, 2.6, 2.7, 2.8], train_slope=0.03) == []
    assert not monitor.should_stop and monitor.best_eval is not None and monitor.best_eval["step"] == 50


def test_early_stopping_needs_consecutive_evals_without_a_new_best() -> None:
    monitor = HealthMonitor(early_stopping_patience=2)
    _train_then_eval(monitor, [2.5, 2.6, 2.4, 2.45])
    assert not monitor.should_stop and monitor.best_eval is not None and monitor.best_eval["val_loss"] == 2.4


def test_learning_rate_off_schedule() -> None:
    monitor = HealthMonitor()
    issued = []
    for i in range(10):
        expected = LR * (1 - i / 20)
        lr = 2 * expected if i == 4 else expected * (1 + 5e-4)  # 5e-4 relative is within the 1e-3 tolerance
        issued += monitor.on_train_row(train_row(i, lr=lr), expected_lr=expected)
    assert fired(issued) == [("lr_off_schedule", 50)]
    assert "1.600e-04" in issued[0].message and "8.000e-05" in issued[0].message


def test_gpu_underutilised_twice_fires_once() -> None:
    warnings = feed(HealthMonitor(), [train_row(i, gpu_util=30.0) for i in range(10)])
    assert fired(warnings) == [("gpu_underutilised", 20)]
    assert "30%" in warnings[0].message and "50%" in warnings[0].message and "batch" in warnings[0].message


@pytest.mark.parametrize(("input_share", "cause", "advice"), [(0.6, "waiting for input", "--packing"),
                                                              (0.03, "to launch its kernels", "--compile")])
def test_gpu_underutilised_names_the_cause_from_the_input_share(input_share: float, cause: str, advice: str) -> None:
    """Our trainer measures the share of each window its loop spent making batches: a large one is an input-bound
    run, a small one a GPU waiting for kernel launches (a step of many small ops), with the fix for each."""
    rows = [train_row(i, gpu_util=30.0, input_share=input_share) for i in range(3)]
    (warning,) = feed(HealthMonitor(), rows)
    assert warning.check == "gpu_underutilised"
    assert cause in warning.message and advice in warning.message and f"{input_share:.0%}" in warning.message


def test_one_low_gpu_window_is_warmup_not_a_bottleneck() -> None:
    assert feed(HealthMonitor(), [train_row(i, gpu_util=30.0 if i == 0 else 90.0) for i in range(10)]) == []


@pytest.mark.parametrize("has_eval", [False, True])
def test_memorization_only_without_an_eval_set(has_eval: bool) -> None:
    losses = [0.5, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03]
    warnings = feed(HealthMonitor(has_eval=has_eval), [train_row(i, loss=loss) for i, loss in enumerate(losses)])
    if has_eval:
        assert warnings == []
    else:
        assert fired(warnings) == [("memorization", 50)]
        assert "0.08" in warnings[0].message and "--eval-split-ratio" in warnings[0].message


def test_a_persisting_condition_fires_once_and_a_recurrence_fires_again() -> None:
    persisting = feed(HealthMonitor(), [train_row(i, grad_norm=40.0 if 5 <= i < 15 else 1.0) for i in range(20)])
    assert fired(persisting) == [("exploding_gradients", 70)]
    exploding = {3, 4, 5, 7, 8}  # clears for one window (index 6), then comes back
    recurring = feed(HealthMonitor(), [train_row(i, grad_norm=40.0 if i in exploding else 1.0) for i in range(12)])
    assert fired(recurring) == [("exploding_gradients", 50), ("exploding_gradients", 90)]


def test_missing_keys_and_none_values_are_skipped() -> None:
    monitor = HealthMonitor(has_eval=False, early_stopping_patience=1)
    for i in range(10):
        assert monitor.on_train_row({"step": i}) == []
        assert monitor.on_train_row(train_row(i, grad_norm=None, lr=None, gpu_util=None), expected_lr=LR) == []
    assert monitor.on_eval_row({"step": 100}) == []
    assert monitor.best_eval is None and not monitor.should_stop


def test_thresholds_are_overridable() -> None:
    thresholds = HealthThresholds(grad_norm_max=50.0, gpu_util_windows=1)
    warnings = feed(HealthMonitor(thresholds), [train_row(i, grad_norm=40.0, gpu_util=30.0) for i in range(3)])
    assert fired(warnings) == [("gpu_underutilised", 10)]


def test_the_embedded_defaults_real_run_gives_no_warning() -> None:
    """Every row of a real `make train` (867 steps, batch 4, noisy window losses, one grad-norm spike of 13.4)."""
    path = Path(__file__).parent / "data" / "embedded_default_metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    monitor = HealthMonitor(has_eval=True)
    for row in rows:
        assert (monitor.on_train_row(row) if row["type"] == "train" else monitor.on_eval_row(row)) == [], row["step"]
    assert len(rows) > 80 and max(row.get("grad_norm") or 0 for row in rows) > 10


def leaves(value: Any) -> int:
    """How many numbers, strings and nulls a JSON value holds."""
    if isinstance(value, dict):
        return sum(map(leaves, value.values()))
    return sum(map(leaves, value)) if isinstance(value, list) else 1


def test_the_state_stays_the_same_size_in_a_long_run_without_evaluations() -> None:
    """Checkpoints hold the state (training_state.pt, HF's trainer_state.json): no field may grow with the run."""
    monitor = HealthMonitor()  # (with an eval set that is never evaluated: memorisation is not checked)
    sizes = []
    for i in range(2000):
        monitor.on_train_row(train_row(i))
        if i in (199, 1999):
            sizes.append(leaves(monitor.json_state_dict()))
    assert monitor.warnings == [] and sizes[1] == sizes[0]


@pytest.mark.parametrize("form", ["state_dict", "json_state_dict"])
def test_a_state_saved_with_every_loss_since_the_last_eval_still_loads(form: str) -> None:
    """An older version kept the list of train losses since the last eval: it loads as their sum and count, and the
    resumed checks decide as the uninterrupted ones."""
    whole = HealthMonitor(early_stopping_patience=2)
    _train_then_eval(whole, [2.5, 2.2, 2.3])
    losses = [4.0 - 0.1 * i for i in range(15, 18)]  # three windows into the fourth interval
    for i, loss in enumerate(losses, 15):
        whole.on_train_row(train_row(i, loss=loss))
    old = getattr(whole, form)()
    del old["_interval_loss_sum"], old["_interval_loss_count"]
    old["_train_losses_since_eval"] = losses
    resumed = HealthMonitor(early_stopping_patience=2)
    if form == "state_dict":
        resumed.load_state_dict(old)
    else:
        resumed.load_json_state_dict(json.loads(json.dumps(old)))
    assert resumed.state_dict() == whole.state_dict()
    for monitor in (whole, resumed):
        for i in (18, 19):
            monitor.on_train_row(train_row(i, loss=4.0 - 0.1 * i))
        monitor.on_eval_row({"step": 200, "val_loss": 2.45})
    assert fired(resumed.warnings) == fired(whole.warnings) == [("overfitting", 200)]
    assert resumed.warnings == whole.warnings and resumed.should_stop and whole.should_stop
