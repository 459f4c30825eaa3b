"""Training health checks: watch the logged rows and say in plain words what looks wrong, why, and what to change.

Pure Python over the rows the trainer already logs (no torch, no I/O), so it costs nothing per step.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Guards relative comparisons against a zero denominator (an expected LR of exactly 0).
_TINY = 1e-12
# How many previous windows' grad norms the jump check compares against.
_GRAD_NORM_HISTORY = 5
# How many earlier windows estimate the window-to-window noise of the loss (for the rising check).
_NOISE_HISTORY = 20
# Below this fraction of the largest LR seen, a decayed schedule is in its tail and a flat loss is expected.
_SCHEDULE_TAIL_FRACTION = 0.1
# The monitor's settings, not its state: a resumed run keeps its own.
_SETTINGS = frozenset({"thresholds", "has_eval", "early_stopping_patience"})


@dataclass
class HealthThresholds:
    """Defaults from common rules of thumb; every one can be overridden."""

    grad_norm_max: float = 10.0  # exploding gradients (norm before clipping)
    grad_norm_jump: float = 10.0  # norm jumps >= this factor vs the median of recent windows
    # ... in this many consecutive windows: one clipped spike is routine, a run of them is not.
    grad_norm_windows: int = 2
    # ... and the absolute limit from this step on: a freshly initialised model's (or head's) gradients are large in
    # its first steps while the loss falls fast; that is not an explosion.
    grad_norm_settle_steps: int = 10
    flat_windows: int = 5  # loss flat over this many consecutive windows -> not learning
    flat_tolerance: float = 0.005  # "flat" = relative change of the loss across those windows below this
    rising_windows: int = 3  # loss rising in this many consecutive windows -> LR too high
    rising_tolerance: float = 0.01  # each rise must exceed this relative amount (noise guard)
    # ... and the whole rise this many standard deviations of the loss's own window-to-window noise: with batch
    # noise, three rises in a row happen by chance every few dozen windows.
    rising_noise_sigmas: float = 4.0
    overfit_patience: int = 2  # val loss rising this many evals in a row while train loss falls
    gpu_util_min: float = 50.0  # % averaged over a window -> the GPU waits for the host
    gpu_util_windows: int = 2  # consecutive low windows before warning (first window includes warmup)
    # ... on the input pipeline when the loop spent more than this share of the window making batches, else on
    # launching kernels (a step of many small ops)
    input_share_max: float = 0.25
    memorization_loss: float = 0.1  # train loss below this with no eval set
    lr_relative_tolerance: float = 1e-3


@dataclass(frozen=True)
class HealthWarning:
    # check is a stable id: "exploding_gradients", "nonfinite_loss", "not_learning", "loss_rising", "overfitting",
    # "lr_off_schedule", "gpu_underutilised" or "memorization".
    check: str
    step: int
    message: str  # what is seen (with the numbers), the likely cause, the fix
    fatal: bool = False  # only nonfinite_loss: the trainer stops and keeps the last good checkpoint


def _number(row: Mapping[str, Any], key: str) -> float | None:
    """The row's value as a float, or None when the key is missing or None (the check is then skipped)."""
    value = row.get(key)
    return None if value is None else float(value)


class HealthMonitor:
    """Feed it every train and eval row; it returns the warnings each row starts.

    A check fires once when its condition starts and again only after the condition has cleared for at least
    one window, so a persisting problem is reported once instead of on every row.
    """

    def __init__(self, thresholds: HealthThresholds | None = None, has_eval: bool = True,
                 early_stopping_patience: int | None = None) -> None:
        self.thresholds = thresholds or HealthThresholds()
        self.has_eval = has_eval
        self.early_stopping_patience = early_stopping_patience
        self.should_stop = False
        self.best_eval: dict[str, Any] | None = None
        self.warnings: list[HealthWarning] = []
        t = self.thresholds
        self._active: set[str] = set()  # checks whose condition held at their last evaluation
        # (loss, learning rate) of the latest consecutive windows with a finite loss.
        self._windows: deque[tuple[float, float | None]] = deque(
            maxlen=max(t.flat_windows, t.rising_windows + 1 + _NOISE_HISTORY))
        self._grad_norms: deque[float] = deque(maxlen=_GRAD_NORM_HISTORY)
        self._high_grad_windows = 0
        self._max_lr = 0.0
        self._zero_lr_windows = 0
        self._low_gpu_windows = 0
        # Sum and count of the finite train losses since the last eval, for their mean (the overfitting check).
        self._interval_loss_sum = 0.0
        self._interval_loss_count = 0
        self._previous_interval_loss: float | None = None  # mean train loss between the last two evals
        self._previous_val_loss: float | None = None
        self._overfit_streak = 0
        self._evals_without_improvement = 0

    def state_dict(self) -> dict[str, Any]:
        """What the checks have seen, for a checkpoint: a resumed run warns (once) and stops early as the
        uninterrupted run would."""
        return copy.deepcopy({key: value for key, value in vars(self).items() if key not in _SETTINGS})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "_train_losses_since_eval" in state:  # an older version kept every loss since the last eval
            losses = state["_train_losses_since_eval"]
            state = {**state, "_interval_loss_sum": float(sum(losses)), "_interval_loss_count": len(losses)}
        for key in vars(self).keys() - _SETTINGS:
            if key in state:  # one the checkpoint lacks (saved by an older version) keeps its fresh value
                setattr(self, key, copy.deepcopy(state[key]))

    def json_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` in JSON's types, for a checkpoint that holds only JSON (HF's trainer_state.json)."""
        state = self.state_dict()
        state["warnings"] = [dataclasses.asdict(warning) for warning in state["warnings"]]
        state["_active"] = sorted(state["_active"])
        state["_windows"] = [list(window) for window in state["_windows"]]
        state["_grad_norms"] = list(state["_grad_norms"])
        return state

    def load_json_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from what :meth:`json_state_dict` gave, back in the checks' own types (the history's length is
        this monitor's: its thresholds may differ from the saved one's)."""
        types = {"warnings": lambda saved: [HealthWarning(**warning) for warning in saved], "_active": set,
                 "_windows": lambda saved: deque(map(tuple, saved), maxlen=self._windows.maxlen),
                 "_grad_norms": lambda saved: deque(saved, maxlen=self._grad_norms.maxlen)}
        self.load_state_dict({key: types[key](value) if key in types else value for key, value in state.items()})

    def _report(self, check: str, step: int, message: str | None, fatal: bool = False) -> list[HealthWarning]:
        """`message` is None when the check's condition does not hold now; warn only when it starts holding."""
        if message is None:
            self._active.discard(check)
            return []
        if check in self._active:
            return []
        self._active.add(check)
        warning = HealthWarning(check, step, message, fatal)
        self.warnings.append(warning)
        return [warning]

    def on_train_row(self, row: Mapping[str, Any], expected_lr: float | None = None) -> list[HealthWarning]:
        step = int(row.get("step", 0))
        loss = _number(row, "loss")
        grad_norm = _number(row, "grad_norm")
        lr = _number(row, "learning_rate")
        gpu_util = _number(row, "gpu_util")
        input_share = _number(row, "input_share")
        issued: list[HealthWarning] = []

        if loss is not None:
            issued += self._check_nonfinite_loss(step, loss)
        if grad_norm is not None and not math.isnan(grad_norm):
            # A nan norm comes with a nan loss (reported above) or a skipped step; it says nothing about scale.
            issued += self._check_grad_norm(step, grad_norm)
        if lr is not None:
            self._max_lr = max(self._max_lr, lr)
            self._zero_lr_windows = self._zero_lr_windows + 1 if lr == 0 else 0
            if expected_lr is not None:
                issued += self._check_lr_schedule(step, lr, expected_lr)
        if loss is not None and math.isfinite(loss):
            self._windows.append((loss, lr))
            self._interval_loss_sum += loss
            self._interval_loss_count += 1
            if lr is not None:
                issued += self._check_not_learning(step, lr)
            issued += self._check_loss_rising(step)
            if not self.has_eval:
                issued += self._check_memorization(step, loss)
        if gpu_util is not None:
            issued += self._check_gpu_util(step, gpu_util, input_share)
        return issued

    def _check_nonfinite_loss(self, step: int, loss: float) -> list[HealthWarning]:
        if math.isfinite(loss):
            return self._report("nonfinite_loss", step, None)
        # The windows before and after a divergence are not one consecutive run of losses.
        self._windows.clear()
        return self._report(
            "nonfinite_loss", step,
            f"Training diverged at step {step}: the loss is {loss}. The last good checkpoint is kept; lower "
            "--learning-rate and check the data for empty or corrupt examples.", fatal=True)

    def _check_grad_norm(self, step: int, grad_norm: float) -> list[HealthWarning]:
        t = self.thresholds
        median = statistics.median(self._grad_norms) if self._grad_norms else 0.0
        fix = "lower --learning-rate or check --max-grad-norm (clipping)."
        message = None
        if grad_norm > t.grad_norm_max and step > t.grad_norm_settle_steps:
            message = (f"Gradient norm is {grad_norm:.4g} at step {step}, above {t.grad_norm_max:g}: the gradients "
                       f"are exploding, usually because the learning rate is too high; {fix}")
        elif median > 0 and grad_norm >= t.grad_norm_jump * median:  # a zero median makes any ratio meaningless
            message = (f"Gradient norm jumped to {grad_norm:.4g} at step {step}, {grad_norm / median:.1f}x the "
                       f"median {median:.4g} of the previous windows: the gradients are exploding, usually because "
                       f"the learning rate is too high; {fix}")
        else:
            self._grad_norms.append(grad_norm)  # the baseline of the jump check is the norm of healthy windows
        self._high_grad_windows = self._high_grad_windows + 1 if message else 0
        if self._high_grad_windows < t.grad_norm_windows:
            message = None
        return self._report("exploding_gradients", step, message)

    def _check_lr_schedule(self, step: int, lr: float, expected_lr: float) -> list[HealthWarning]:
        tolerance = self.thresholds.lr_relative_tolerance * max(abs(expected_lr), _TINY)
        message = None
        if abs(lr - expected_lr) > tolerance:
            message = (f"Learning rate is {lr:.3e} at step {step} but the schedule expects {expected_lr:.3e}: the "
                       "scheduler is not stepped once per optimizer step, or a resumed run did not restore its "
                       "state; check --lr-scheduler-type, --warmup-ratio and the checkpoint you resumed from.")
        return self._report("lr_off_schedule", step, message)

    def _check_not_learning(self, step: int, lr: float) -> list[HealthWarning]:
        windows = self.thresholds.flat_windows
        if self._zero_lr_windows >= windows:
            # With LR 0 the weights never move, even if batch-to-batch noise keeps the loss from looking flat.
            return self._report(
                "not_learning", step,
                f"The learning rate has been 0 for {self._zero_lr_windows} logging windows (step {step}), so the "
                "weights are not changing: the model is not learning. Set --learning-rate above 0, and check that "
                "--lr-scheduler-type, --warmup-ratio and --max-steps do not hold it at 0.")
        recent = list(self._windows)[-windows:]
        losses = [loss for loss, _ in recent]
        lrs = [window_lr for _, window_lr in recent if window_lr is not None]
        message = None
        if len(recent) == windows and len(lrs) == windows and min(losses) > 0:
            change = (max(losses) - min(losses)) / (sum(losses) / windows)
            # A flat loss is expected in the tail of a decayed schedule; during warmup the LR has not arrived yet.
            tail = lr < _SCHEDULE_TAIL_FRACTION * self._max_lr
            warming_up = lrs[-1] > lrs[0]
            if change < self.thresholds.flat_tolerance and not tail and not warming_up:
                message = (f"The loss has stayed between {min(losses):.4g} and {max(losses):.4g} (a {change:.2%} "
                           f"change) over the last {windows} logging windows up to step {step} with learning rate "
                           f"{lr:.3e}: the model is not learning. The LR is too low or the data/labels are broken "
                           "(e.g. every label masked); raise --learning-rate or check the dataset format.")
        return self._report("not_learning", step, message)

    def _check_loss_rising(self, step: int) -> list[HealthWarning]:
        t = self.thresholds
        history = [loss for loss, _ in self._windows]
        losses, before = history[-(t.rising_windows + 1):], history[:-(t.rising_windows + 1)]
        # Noise of one window's loss, from the differences of consecutive earlier windows (slow trends cancel).
        differences = [b - a for a, b in itertools.pairwise(before)]
        noise = statistics.stdev(differences) / math.sqrt(2) if len(differences) >= 2 else 0.0
        message = None
        if len(losses) == t.rising_windows + 1 and all(
                losses[i + 1] - losses[i] > t.rising_tolerance * abs(losses[i]) for i in range(t.rising_windows)
        ) and losses[-1] - losses[0] > t.rising_noise_sigmas * noise:
            message = (f"The loss rose in each of the last {t.rising_windows} logging windows, from {losses[0]:.4g} "
                       f"to {losses[-1]:.4g} at step {step}: the learning rate is too high. Lower --learning-rate "
                       "or add warmup (--warmup-ratio).")
        return self._report("loss_rising", step, message)

    def _check_memorization(self, step: int, loss: float) -> list[HealthWarning]:
        limit = self.thresholds.memorization_loss
        message = None
        if loss < limit:
            message = (f"Training loss is {loss:.4g} at step {step} (below {limit:g}) and there is no validation "
                       "set to tell learning from copying: possible memorisation; hold out a validation split "
                       "(--eval-split-ratio).")
        return self._report("memorization", step, message)

    def _check_gpu_util(self, step: int, gpu_util: float, input_share: float | None = None) -> list[HealthWarning]:
        """``input_share``: the share of the window the loop spent making batches (None: not measured, as in the HF
        Trainer, whose data loading happens inside it): says which of the two causes held the GPU back."""
        t = self.thresholds
        self._low_gpu_windows = self._low_gpu_windows + 1 if gpu_util < t.gpu_util_min else 0
        message = None
        if self._low_gpu_windows >= t.gpu_util_windows:
            message = (f"GPU utilisation averaged {gpu_util:.0f}% at step {step}, below {t.gpu_util_min:g}% for "
                       f"{self._low_gpu_windows} logging windows in a row: ")
            if input_share is None:
                message += ("the GPU is waiting for the host, either for input (the input pipeline is CPU bound) or "
                            "for kernel launches (each kernel has too little work). Use a larger "
                            "--per-device-train-batch-size, keep --packing on, and move tokenization and collation "
                            "off the training loop's main thread.")
            elif input_share > t.input_share_max:
                message += (f"the training loop spent {input_share:.0%} of the window making batches, so the GPU is "
                            "waiting for input. Keep --packing on (fewer, fuller rows to collate), use a larger "
                            "--per-device-train-batch-size, and keep other work off the training process's CPU.")
            else:
                message += (f"making batches took only {input_share:.0%} of the window, so the GPU is waiting for "
                            "the host to launch its kernels: each has too little work. Give them more: a larger "
                            "--per-device-train-batch-size or longer rows (--max-seq-length, with --packing), or "
                            "--compile (fewer, fused kernels).")
        return self._report("gpu_underutilised", step, message)

    def on_eval_row(self, row: Mapping[str, Any]) -> list[HealthWarning]:
        val_loss = _number(row, "val_loss")
        if val_loss is None or not math.isfinite(val_loss):
            return []
        step = int(row.get("step", 0))
        best_before = self.best_eval

        count = self._interval_loss_count
        interval_loss = self._interval_loss_sum / count if count else None
        previous_interval_loss = self._previous_interval_loss
        val_rose = self._previous_val_loss is not None and val_loss > self._previous_val_loss
        train_fell = (interval_loss is not None and previous_interval_loss is not None
                      and interval_loss < previous_interval_loss)
        self._overfit_streak = self._overfit_streak + 1 if val_rose and train_fell else 0
        message = None
        # At least one counted eval, so both train means exist even with a patience of 0.
        if self._overfit_streak >= max(1, self.thresholds.overfit_patience) and best_before is not None:
            best_step, best_loss = best_before["step"], float(best_before["val_loss"])
            message = (
                f"Validation loss rose for {self._overfit_streak} evaluations in a row (to {val_loss:.4g} at step "
                f"{step}) while the training loss kept falling (from {previous_interval_loss:.4g} to "
                f"{interval_loss:.4g}): the model is overfitting. The best validation loss was {best_loss:.4g} at "
                f"step {best_step}; train for fewer epochs, add data"
                + ("" if self.early_stopping_patience else ", or use --early-stopping-patience")
                + f", and pick the best checkpoint (step {best_step}).")
        issued = self._report("overfitting", step, message)

        if best_before is None or val_loss < float(best_before["val_loss"]):
            self.best_eval = dict(row)
            self._evals_without_improvement = 0
        else:
            self._evals_without_improvement += 1
        patience = self.early_stopping_patience
        if patience is not None and self._evals_without_improvement >= patience:
            self.should_stop = True

        self._previous_val_loss = val_loss
        if interval_loss is not None:
            self._previous_interval_loss = interval_loss
        self._interval_loss_sum, self._interval_loss_count = 0.0, 0
        return issued
