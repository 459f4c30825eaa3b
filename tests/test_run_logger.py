"""RunLogger's run files: each row's cost does not grow with the run's history, and the files stay complete."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest

from lamelm_fast.metrics import logger as logger_module
from lamelm_fast.metrics.logger import METRICS_REWRITE_SECONDS, RunLogger, training_metrics, unpack_rows
from lamelm_fast.train.reporting import SilentLogger

SECONDS_PER_ROW = 0.1  # a fast run logging every step


class Clock:
    """The logger's clock, advanced by hand: each row takes SECONDS_PER_ROW, a rewrite ``write_seconds``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.write_seconds = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(logger_module, "time", clock)
    return clock


@pytest.fixture
def rewrites(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> list[int]:
    """The number of train steps training_metrics.json held at each rewrite."""
    written: list[int] = []
    write = logger_module.write_json_atomic

    def counting(path: Path, value: Any) -> None:
        if path.name == "training_metrics.json":
            written.append(len(value["steps"]))
            clock.now += clock.write_seconds
        write(path, value)

    monkeypatch.setattr(logger_module, "write_json_atomic", counting)
    return written


def train_row(step: int) -> dict[str, Any]:
    return {"step": step, "loss": 3.0 - step / 1000, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": step / 500}


def log_rows(logger: RunLogger, clock: Clock, steps: range) -> None:
    for step in steps:
        clock.now += SECONDS_PER_ROW
        logger.train_row(train_row(step))


def file_arrays(run_dir: Path) -> dict[str, list[Any]]:
    return json.loads((run_dir / "training_metrics.json").read_text())


def test_train_rows_rewrite_training_metrics_at_most_every_few_seconds(tmp_path: Path, clock: Clock,
                                                                       rewrites: list[int]) -> None:
    logger = RunLogger(tmp_path, total_steps=1000, quiet=True)
    log_rows(logger, clock, range(1, 1001))  # 100 s
    assert rewrites[0] == 1  # the first row at once: the file is there from the start
    assert len(rewrites) <= 1 + 1000 * SECONDS_PER_ROW / METRICS_REWRITE_SECONDS
    # Never more than the interval behind: each rewrite came as soon as it was due.
    gaps = [b - a for a, b in zip(rewrites, rewrites[1:], strict=False)]
    assert max(gaps) <= METRICS_REWRITE_SECONDS / SECONDS_PER_ROW + 1
    logger.close()
    assert rewrites[-1] == 1000
    assert file_arrays(tmp_path) == training_metrics(logger.history)
    assert file_arrays(tmp_path)["steps"] == list(range(1, 1001))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 1001))  # metrics.jsonl still gets every row as it comes


def test_slow_rewrites_are_spaced_out_so_a_long_history_costs_a_bounded_share_of_the_time(
        tmp_path: Path, clock: Clock, rewrites: list[int]) -> None:
    clock.write_seconds = 1.0  # as a history of some 300k rows takes
    logger = RunLogger(tmp_path, total_steps=2000, quiet=True)
    log_rows(logger, clock, range(1, 2001))  # 200 s of rows
    assert 2 <= len(rewrites) <= 1 + 200 / 50  # one rewrite per 50 s: 2% of the time
    logger.close()


def test_evaluations_summary_flush_and_close_bring_the_file_up_to_date(
        tmp_path: Path, clock: Clock, rewrites: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RunLogger, "_write_plots", lambda self: None)  # (drawn as before: at evaluations, the end)
    logger = RunLogger(tmp_path, total_steps=30, quiet=True)
    log_rows(logger, clock, range(1, 6))
    assert file_arrays(tmp_path)["steps"] == [1]
    logger.eval_row({"step": 5, "epoch": 0.01, "val_loss": 2.5, "val_perplexity": 12.2, "val_token_accuracy": 0.4})
    assert file_arrays(tmp_path) == training_metrics(logger.history) and file_arrays(tmp_path)["val_loss"][-1] == 2.5
    log_rows(logger, clock, range(6, 9))
    logger.flush()
    assert file_arrays(tmp_path)["steps"] == list(range(1, 9))
    count = len(rewrites)
    logger.flush()  # nothing new: no rewrite
    assert len(rewrites) == count
    log_rows(logger, clock, range(9, 11))
    logger.summary({"steps": 10})
    assert file_arrays(tmp_path)["steps"] == list(range(1, 11))
    log_rows(logger, clock, range(11, 13))
    logger.close()
    assert file_arrays(tmp_path) == training_metrics(logger.history)
    assert file_arrays(tmp_path)["steps"] == list(range(1, 13))


def test_a_resumed_logger_writes_the_carried_rows_and_continues(tmp_path: Path, clock: Clock,
                                                               rewrites: list[int]) -> None:
    carried = [{"type": "train", **train_row(step)} for step in range(1, 6)]
    logger = RunLogger(tmp_path, total_steps=10, quiet=True, resume_step=3, resume_rows=carried)
    assert file_arrays(tmp_path)["steps"] == [1, 2, 3]  # rows after the checkpoint's step run again
    log_rows(logger, clock, range(4, 11))
    logger.close()
    assert file_arrays(tmp_path)["steps"] == list(range(1, 11)) and len(rewrites) == 2


def test_packed_rows_are_metrics_jsonl_gzipped_at_any_point_and_carry_a_resumed_runs_rows(
        tmp_path: Path, clock: Clock) -> None:
    """A checkpoint's rows come from a running compressor: each copy holds every row so far, and logging goes on."""
    logger = RunLogger(tmp_path / "run", total_steps=10, quiet=True)
    log_rows(logger, clock, range(1, 4))
    first = logger.packed_rows()
    log_rows(logger, clock, range(4, 6))
    logger.close()
    assert gzip.decompress(first) == "".join(json.dumps(row) + "\n" for row in logger.history[:3]).encode()
    assert gzip.decompress(logger.packed_rows()) == (tmp_path / "run" / "metrics.jsonl").read_bytes()

    resumed = RunLogger(tmp_path / "elsewhere", total_steps=10, quiet=True, resume_step=4,
                        resume_rows=unpack_rows(logger.packed_rows()))
    log_rows(resumed, clock, range(5, 7))
    resumed.close()
    assert [row["step"] for row in unpack_rows(resumed.packed_rows())] == [1, 2, 3, 4, 5, 6]
    # The previous version's checkpoints held them zlib-compressed in the training state: still read.
    assert unpack_rows(zlib.compress((tmp_path / "run" / "metrics.jsonl").read_bytes())) == logger.history


def test_the_silent_logger_of_other_ranks_has_every_method_the_loop_calls() -> None:
    public = {name for name in vars(RunLogger) if not name.startswith("_")}
    assert public <= set(vars(SilentLogger)), public - set(vars(SilentLogger))
    assert SilentLogger().packed_rows() is None  # rank 0 alone writes a checkpoint's rows
