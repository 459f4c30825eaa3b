"""Training plots as PNG files in the run directory: the loss and LR curves, and the loss per epoch.

Rendering uses a private ``Figure`` + Agg canvas, never pyplot, so the caller's matplotlib backend and global
figure list stay untouched (safe in a training process, a notebook or a headless server).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lamelm_fast.metrics.atomic import atomic_write

TRAINING_CURVE = "training_curve.png"
LOSS_BY_EPOCH = "loss_by_epoch.png"
_DPI = 100


def epoch_number(epoch: float) -> int:
    """The 1-based epoch a point falls in: a point logged at epoch 2.0 ends epoch 2, one at 2.25 is in epoch 3."""
    # The tolerance absorbs float sums like 0.1 * 10 = 1.0000000000000002 at an epoch boundary.
    return max(1, math.ceil(epoch - 1e-9))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pairs(rows: Iterable[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows where both are finite numbers; missing keys in older files are skipped."""
    points = [(row["step"], row[key]) for row in rows if _finite(row.get("step")) and _finite(row.get(key))]
    steps = np.array([p[0] for p in points], dtype=float)
    values = np.array([p[1] for p in points], dtype=float)
    return steps, values


@dataclass(frozen=True)
class CurveData:
    """The arrays drawn in ``training_curve.png``."""

    train_steps: np.ndarray
    train_loss: np.ndarray
    val_steps: np.ndarray
    val_loss: np.ndarray
    lr_steps: np.ndarray
    learning_rate: np.ndarray  # positive values only: a log axis cannot show 0 (warmup start, end of decay)

    def empty(self) -> bool:
        return not (self.train_loss.size or self.val_loss.size)


@dataclass(frozen=True)
class EpochData:
    """The arrays drawn in ``loss_by_epoch.png``."""

    train_epochs: np.ndarray
    mean_train_loss: np.ndarray
    val_epochs: np.ndarray
    last_val_loss: np.ndarray

    def empty(self) -> bool:
        return not (self.mean_train_loss.size or self.last_val_loss.size)


def curve_data(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> CurveData:
    train_steps, train_loss = _pairs(train_rows, "loss")
    val_steps, val_loss = _pairs(eval_rows, "val_loss")
    lr_steps, learning_rate = _pairs(train_rows, "learning_rate")
    positive = learning_rate > 0
    return CurveData(train_steps, train_loss, val_steps, val_loss, lr_steps[positive], learning_rate[positive])


def epoch_data(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> EpochData:
    """Mean train loss of each epoch and the last val loss of each epoch, keyed by :func:`epoch_number`."""
    train_losses: dict[int, list[float]] = {}
    for row in train_rows:
        if _finite(row.get("loss")) and _finite(row.get("epoch")):
            train_losses.setdefault(epoch_number(row["epoch"]), []).append(float(row["loss"]))

    # Eval rows written without an epoch get it from the train rows' step -> epoch relation.
    known_steps, known_epochs = _pairs(train_rows, "epoch")
    order = np.argsort(known_steps)  # np.interp needs increasing x
    known_steps, known_epochs = known_steps[order], known_epochs[order]
    last_val: dict[int, tuple[float, float]] = {}  # epoch -> (step, val loss) of its latest evaluation
    for row in eval_rows:
        if not (_finite(row.get("val_loss")) and _finite(row.get("step"))):
            continue
        if _finite(row.get("epoch")):
            epoch = float(row["epoch"])
        elif known_steps.size:
            epoch = float(np.interp(row["step"], known_steps, known_epochs))
        else:
            continue
        number = epoch_number(epoch)
        if number not in last_val or row["step"] >= last_val[number][0]:
            last_val[number] = (float(row["step"]), float(row["val_loss"]))

    train_epochs = sorted(train_losses)
    val_epochs = sorted(last_val)
    return EpochData(np.array(train_epochs, dtype=float),
                     np.array([np.mean(train_losses[e]) for e in train_epochs], dtype=float),
                     np.array(val_epochs, dtype=float), np.array([last_val[e][1] for e in val_epochs], dtype=float))


def _save_atomic(figure: Figure, path: Path) -> None:
    with atomic_write(path) as handle:
        FigureCanvasAgg(figure).print_png(handle)


def _training_curve(data: CurveData) -> Figure:
    figure = Figure(figsize=(8, 6), dpi=_DPI, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    if data.train_loss.size:
        loss_axes.plot(data.train_steps, data.train_loss, color="tab:blue", linewidth=1, label="train loss")
    if data.val_loss.size:
        loss_axes.plot(data.val_steps, data.val_loss, color="tab:orange", marker="o", markersize=3, linewidth=1.5,
                       label="val loss")
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(loc="upper right")
    if data.learning_rate.size:
        lr_axes.plot(data.lr_steps, data.learning_rate, color="tab:green", linewidth=1)
        lr_axes.set_yscale("log")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    return figure


def _loss_by_epoch(data: EpochData) -> Figure:
    figure = Figure(figsize=(7, 4.5), dpi=_DPI, layout="constrained")
    axes = figure.subplots()
    if data.mean_train_loss.size:
        axes.plot(data.train_epochs, data.mean_train_loss, color="tab:blue", marker="o", label="mean train loss")
    if data.last_val_loss.size:
        axes.plot(data.val_epochs, data.last_val_loss, color="tab:orange", marker="s", label="last val loss")
    epochs = np.union1d(data.train_epochs, data.val_epochs)
    axes.set_xticks(epochs)  # whole epochs only: the points are per epoch, fractional ticks would mislead
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    return figure


def write_plots(run_dir: Path, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``training_curve.png`` and ``loss_by_epoch.png`` into ``run_dir``; returns the paths written."""
    run_dir = Path(run_dir)
    written = []
    curve = curve_data(train_rows, eval_rows)
    if not curve.empty():
        _save_atomic(_training_curve(curve), run_dir / TRAINING_CURVE)
        written.append(run_dir / TRAINING_CURVE)
    epochs = epoch_data(train_rows, eval_rows)
    if not epochs.empty():
        _save_atomic(_loss_by_epoch(epochs), run_dir / LOSS_BY_EPOCH)
        written.append(run_dir / LOSS_BY_EPOCH)
    return written
