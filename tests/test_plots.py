"""Run plots: the arrays drawn come from the rows as expected, the PNGs decode, and writing is atomic."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from lamelm_fast.metrics.plots import LOSS_BY_EPOCH, TRAINING_CURVE, curve_data, epoch_data, epoch_number, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_rows(count: int, steps_per_epoch: int, zero_lr_at: tuple[int, ...] = ()) -> list[dict]:
    return [{"type": "train", "step": step, "loss": 2.0 + 3.0 * math.exp(-step / 10), "grad_norm": 1.0,
             "learning_rate": 0.0 if step in zero_lr_at else 1e-3 * (1 - step / (count + 1)),
             "epoch": step / steps_per_epoch, "token_accuracy": 0.5, "tokens_per_second": 1000.0}
            for step in range(1, count + 1)]


def eval_rows(steps: list[int], steps_per_epoch: int | None) -> list[dict]:
    rows = [{"type": "eval", "step": step, "val_loss": 2.5 + step / 100} for step in steps]
    if steps_per_epoch:
        for row in rows:
            row["epoch"] = row["step"] / steps_per_epoch
    return rows


def test_epoch_number_puts_a_boundary_point_in_the_epoch_it_ends() -> None:
    assert [epoch_number(e) for e in (0.0, 0.25, 1.0, 0.1 * 10, 1.0000001, 2.0, 2.5)] == [1, 1, 1, 1, 2, 2, 3]


def test_curve_data_plots_every_finite_point_and_drops_zero_learning_rates() -> None:
    rows = train_rows(30, 12, zero_lr_at=(1, 30))
    rows.append({"type": "train", "step": 31, "loss": float("nan"), "learning_rate": 1e-4})  # a diverged step
    data = curve_data(rows, eval_rows([10, 20, 30], 12))
    assert data.train_steps.tolist() == list(range(1, 31))
    assert data.train_loss == pytest.approx([r["loss"] for r in rows[:30]])
    assert data.val_steps.tolist() == [10, 20, 30] and data.val_loss == pytest.approx([2.6, 2.7, 2.8])
    assert data.lr_steps.tolist() == [*range(2, 30), 31]  # zeros cannot sit on a log axis
    assert (data.learning_rate > 0).all()


def test_epoch_data_means_train_loss_per_epoch_and_keeps_the_last_val_loss_of_each() -> None:
    rows = train_rows(30, 12)  # epochs 1 and 2 full (12 steps each), epoch 3 partial (6 steps)
    data = epoch_data(rows, eval_rows([6, 12, 18, 24, 30], 12))
    losses = [r["loss"] for r in rows]
    assert data.train_epochs.tolist() == [1, 2, 3]
    assert data.mean_train_loss == pytest.approx([np.mean(losses[:12]), np.mean(losses[12:24]), np.mean(losses[24:])])
    assert data.val_epochs.tolist() == [1, 2, 3]
    assert data.last_val_loss == pytest.approx([2.62, 2.74, 2.8])  # steps 12, 24 and 30


def test_eval_rows_without_an_epoch_take_it_from_the_train_rows() -> None:
    rows = train_rows(30, 12)[4::5]  # logged every 5 steps: 5, 10, ..., 30
    data = epoch_data(rows, eval_rows([12, 13, 24], steps_per_epoch=None))
    assert data.val_epochs.tolist() == [1, 2] and data.last_val_loss == pytest.approx([2.62, 2.74])


def test_write_plots_writes_decodable_pngs(tmp_path: Path) -> None:
    written = write_plots(tmp_path, train_rows(30, 12, zero_lr_at=(30,)), eval_rows([10, 20, 30], 12))
    assert written == [tmp_path / TRAINING_CURVE, tmp_path / LOSS_BY_EPOCH]
    for path, (height, width) in zip(written, [(600, 800), (450, 700)], strict=True):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.shape[:2] == (height, width)
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TRAINING_CURVE, LOSS_BY_EPOCH])


def test_all_zero_learning_rates_still_plot(tmp_path: Path) -> None:
    rows = train_rows(8, 4, zero_lr_at=tuple(range(1, 9)))
    assert curve_data(rows, []).learning_rate.size == 0
    assert write_plots(tmp_path, rows, []) == [tmp_path / TRAINING_CURVE, tmp_path / LOSS_BY_EPOCH]
    assert imread(tmp_path / TRAINING_CURVE).shape[:2] == (600, 800)


def test_empty_inputs_write_nothing(tmp_path: Path) -> None:
    assert write_plots(tmp_path, [], []) == []
    assert write_plots(tmp_path, [{"type": "train", "step": 1}], []) == []  # an old row without a loss
    assert list(tmp_path.iterdir()) == []


def test_previous_png_is_replaced_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    (tmp_path / TRAINING_CURVE).write_bytes(b"previous")
    write_plots(tmp_path, train_rows(10, 5), [])
    assert (tmp_path / TRAINING_CURVE).read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_crash_while_rendering_leaves_the_previous_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / TRAINING_CURVE).write_bytes(b"previous")

    def crash(self: FigureCanvasAgg, *args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_plots(tmp_path, train_rows(10, 5), [])
    assert (tmp_path / TRAINING_CURVE).read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [TRAINING_CURVE]


def test_a_thousand_rows_plot_in_under_a_second(tmp_path: Path) -> None:
    rows, evals = train_rows(1000, 300), eval_rows(list(range(100, 1001, 100)), 300)
    write_plots(tmp_path, rows[:10], [])  # warm up matplotlib's caches (fonts), which a training run pays once
    started = time.perf_counter()
    write_plots(tmp_path, rows, evals)
    assert time.perf_counter() - started < 1.0
