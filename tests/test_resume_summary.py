"""A resumed run's summary and explain report cover the whole run (every segment), not only the resumed steps."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from conftest import as_saved_by_an_older_version, embedded_records, write_jsonl
from lamelm_fast.explain import analyse, load_run
from lamelm_fast.metrics import logger as logger_module
from lamelm_fast.metrics.health import HealthMonitor
from lamelm_fast.train import TrainConfig, train
from lamelm_fast.train import checkpoint as checkpoint_module
from lamelm_fast.train.data import LABELS_VERSION

# Counted and looked-up fields that the interrupted run must reproduce exactly; losses to float rounding.
SAME = ("steps", "best_val_step", "tokens", "target_tokens", "samples", "warnings", "stopped_early")
CLOSE = ("first_loss", "final_loss", "mean_train_loss", "best_val_loss", "final_val_perplexity")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", embedded_records(48))


def config(dataset: Path, model_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), finetune="full", learning_rate=1e-3,
                  max_seq_length=128, per_device_train_batch_size=4, eval_split_ratio=0.25, eval_steps=2,
                  logging_steps=1, max_steps=8, save_steps=4, output_dir=str(output_dir), quiet=True, seed=5)
    return TrainConfig(**{**values, **overrides})


def interrupted(full_run: Path, run_dir: Path, at: int, in_place: bool) -> None:
    """``run_dir`` as a run killed after its checkpoint at step ``at`` would leave it. In place: with the later rows
    of its metrics.jsonl, which the resume must not count twice. Else only that checkpoint, copied elsewhere."""
    if in_place:
        shutil.copytree(full_run, run_dir, ignore=lambda _, names: [
            name for name in names if name == "summary.json" or name.startswith("checkpoint-")
            and int(name.removeprefix("checkpoint-")) > at])
    else:
        shutil.copytree(full_run / f"checkpoint-{at}", run_dir / f"checkpoint-{at}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset: Path):
    return train(config(dataset, tiny_model_dir, tmp_path_factory.mktemp("full") / "run"))


def assert_same_run(summary: dict, expected: dict) -> None:
    for key in SAME:
        assert summary[key] == expected[key], key
    for key in CLOSE:
        assert summary[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "checkpoint copied to a new directory"])
def test_resumed_summary_and_explain_cover_the_whole_run(tmp_path: Path, tiny_model_dir: Path, dataset: Path,
                                                         uninterrupted, in_place: bool) -> None:
    run_dir = tmp_path / "run"
    interrupted(uninterrupted.run_dir, run_dir, 4, in_place)
    resumed = train(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint="latest"))
    expected = uninterrupted.summary
    assert expected["segments"] == 1 and expected["segment_first_step"] == 1 and expected["best_val_step"] == 8
    assert expected["tokens"] > expected["target_tokens"] > 0 and expected["samples"] == 32  # 8 steps x 4
    summary = resumed.summary
    assert_same_run(summary, expected)
    assert summary["segments"] == 2 and summary["segment_first_step"] == 5
    # The runtime adds up the segments' own time; the rates divide the whole run's counts by it.
    assert summary["runtime_seconds"] > summary["segment_runtime_seconds"] > 0
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["runtime_seconds"])

    analysis = analyse(load_run(run_dir))
    assert analysis["mean_vs_final"]["first_loss"] == pytest.approx(expected["first_loss"], rel=1e-6)
    assert "trained in 2 segments (resumed last at step 4)" in analysis["segments"]["text"]
    assert "the last segment alone (steps 5-8" in analysis["throughput"]["text"]
    # Every row once, in either directory: the checkpoint carries the rows up to it, and in place the interrupted
    # segment's rows after the checkpoint were replaced.
    assert (analysis["first_step"], analysis["last_step"], analysis["train_points"]) == (1, 8, 8)
    assert analysis["eval_points"] == 4 and "logs start" not in analysis["segments"]["text"]


# Measured, not computed: they differ from run to run.
TIMING = ("tokens_per_second", "samples_per_second", "mfu", "memory_gb", "input_share")


def same_value(value: object, expected: object) -> bool:
    """Floats to rounding (the resumed steps ran in another process), anything else exactly."""
    return value == pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else value == expected


def logged_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


def assert_same_rows(rows: list[dict], expected_rows: list[dict]) -> None:
    assert [(row["type"], row["step"]) for row in rows] == [(row["type"], row["step"]) for row in expected_rows]
    for row, expected_row in zip(rows, expected_rows, strict=True):
        assert row.keys() == expected_row.keys(), (row["type"], row["step"])
        for key, value in expected_row.items():
            assert same_value(row[key], value), (row["type"], row["step"], key)


def without_rows(checkpoint: Path, *entries: str) -> None:
    """As an older version saved it: no rows file (and without the training-state ``entries``)."""
    (checkpoint / checkpoint_module.ROWS_FILE).unlink()
    as_saved_by_an_older_version(checkpoint, *entries)  # re-lists the files


def as_saved_by_the_previous_version(checkpoint: Path) -> None:
    """The rows in the training state ("history", zlib-compressed metrics.jsonl lines), not in a file of their own."""
    lines = gzip.decompress((checkpoint / checkpoint_module.ROWS_FILE).read_bytes())
    state = checkpoint_module.load_training_state(checkpoint)
    torch.save({**state, "history": zlib.compress(lines)}, checkpoint / checkpoint_module.STATE_FILE)
    without_rows(checkpoint)


@pytest.mark.parametrize("where", ["in place", "checkpoint copied to a new directory",
                                   "new directory resuming the old one's checkpoint"])
def test_a_resumed_runs_logs_curves_and_explain_report_are_the_uninterrupted_runs(
        tmp_path: Path, tiny_model_dir: Path, dataset: Path, uninterrupted, where: str) -> None:
    run_dir = tmp_path / "run"
    if where == "new directory resuming the old one's checkpoint":
        interrupted(uninterrupted.run_dir, tmp_path / "old", 4, in_place=True)
        resume_from = str(tmp_path / "old" / "checkpoint-4")
    else:
        interrupted(uninterrupted.run_dir, run_dir, 4, in_place=where == "in place")
        resume_from = "latest"
    train(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint=resume_from))

    assert_same_rows(logged_rows(run_dir), logged_rows(uninterrupted.run_dir))
    arrays, expected_arrays = (json.loads((path / "training_metrics.json").read_text())
                               for path in (run_dir, uninterrupted.run_dir))
    assert arrays.keys() == expected_arrays.keys() and arrays["steps"] == list(range(1, 9))
    for key, values in expected_arrays.items():
        assert len(arrays[key]) == len(values) and all(map(same_value, arrays[key], values)), key
    for plot in ("training_curve.png", "loss_by_epoch.png"):
        assert (run_dir / plot).is_file(), plot

    analysis, expected = analyse(load_run(run_dir)), analyse(load_run(uninterrupted.run_dir))
    for key in ("train_points", "eval_points", "first_step", "last_step", "warnings"):
        assert analysis[key] == expected[key], key
    assert analysis["checkpoints"] == ([8] if resume_from != "latest" else [4, 8])  # checkpoint-4 stayed in old/
    for key in ("phases", "mean_vs_final", "end_fluctuation", "overfitting"):
        assert analysis[key]["text"] == expected[key]["text"], key
    assert analysis["overfitting"]["verdict"] == expected["overfitting"]["verdict"]
    assert [m["label"] for m in analysis["milestones"]] == [m["label"] for m in expected["milestones"]]
    assert analysis["checkpoint"]["step"] == expected["checkpoint"]["step"] == 8


def test_a_checkpoint_without_logged_rows_resumed_elsewhere_says_where_the_logs_start(
        tmp_path: Path, tiny_model_dir: Path, dataset: Path, uninterrupted, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    interrupted(uninterrupted.run_dir, run_dir, 4, in_place=False)
    without_rows(run_dir / "checkpoint-4")
    capsys.readouterr()
    resumed = train(dataclasses.replace(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint="latest"),
                                        quiet=False))
    notes = [line for line in capsys.readouterr().out.splitlines() if "carries no logged rows" in line]
    assert len(notes) == 1 and "metrics.jsonl, curves and explain report start at step 5" in notes[0]
    assert "summary.json still covers the whole run" in notes[0]
    assert_same_run(resumed.summary, uninterrupted.summary)  # the run totals came with the checkpoint
    # The earlier rows are in the other directory: explain says so, and takes the whole run's figures from the summary.
    analysis = analyse(load_run(run_dir))
    expected = uninterrupted.summary
    assert analysis["first_step"] == 5 and "logs start at step 5" in analysis["segments"]["text"]
    assert f"first loss {expected['first_loss']:.4f}" in analysis["segments"]["text"]
    assert f"best val loss {expected['best_val_loss']:.4f} at step 8" in analysis["segments"]["text"]


def test_an_uninterrupted_run_says_nothing_of_segments(uninterrupted) -> None:
    analysis = analyse(load_run(uninterrupted.run_dir))
    assert analysis["segments"]["text"] == "" and "last segment" not in analysis["throughput"]["text"]


# LR 0: "not learning" from the 5th window on.
NOT_LEARNING = dict(learning_rate=0.0, eval_split_ratio=0.0, max_steps=12, save_steps=6)


@pytest.fixture(scope="module")
def not_learning(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset: Path):
    """The uninterrupted run of NOT_LEARNING, read (and copied) by the tests, never changed."""
    return train(config(dataset, tiny_model_dir, tmp_path_factory.mktemp("not-learning") / "full", **NOT_LEARNING))


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "checkpoint copied to a new directory"])
def test_a_warning_of_the_first_segment_is_counted_once(tmp_path: Path, tiny_model_dir: Path, dataset: Path,
                                                        not_learning, in_place: bool) -> None:
    # The resumed health checks know the warning was said already.
    settings, full = NOT_LEARNING, not_learning
    assert [(row["step"], row["check"]) for row in full.history if row["type"] == "warning"] == [(5, "not_learning")]
    interrupted(full.run_dir, tmp_path / "resumed", 6, in_place)
    resumed = train(config(dataset, tiny_model_dir, tmp_path / "resumed", resume_from_checkpoint="latest",
                           **settings))
    assert [row for row in resumed.history if row["type"] == "warning" and row["step"] > 6] == []
    assert resumed.summary["warnings"] == full.summary["warnings"] == 1


def test_the_best_checkpoint_of_the_first_segment_stays_the_best_and_is_not_pruned(
        tmp_path: Path, tiny_model_dir: Path, dataset: Path) -> None:
    # LR 0: every evaluation equals the first, which stays the best; early stopping saved checkpoint-2 for it.
    settings = dict(learning_rate=0.0, early_stopping_patience=100)
    full = train(config(dataset, tiny_model_dir, tmp_path / "full", **settings))
    assert full.summary["best_checkpoint"] == str(full.run_dir / "checkpoint-2")
    interrupted(full.run_dir, tmp_path / "resumed", 4, in_place=True)
    resumed = train(config(dataset, tiny_model_dir, tmp_path / "resumed", resume_from_checkpoint="latest",
                           save_total_limit=1, **settings))
    assert resumed.summary["best_checkpoint"] == str(resumed.run_dir / "checkpoint-2")
    assert resumed.summary["best_val_step"] == 2
    # Pruning to one checkpoint spares the best: as an uninterrupted run with this limit would leave it.
    assert sorted(p.name for p in resumed.run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]


def test_a_checkpoint_without_run_totals_still_resumes_and_says_what_is_missing(
        tmp_path: Path, tiny_model_dir: Path, dataset: Path, uninterrupted, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    interrupted(uninterrupted.run_dir, run_dir, 4, in_place=True)
    without_rows(run_dir / "checkpoint-4", "report")
    capsys.readouterr()
    resumed = train(dataclasses.replace(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint="latest"),
                                        quiet=False))
    out = capsys.readouterr().out
    assert "holds no run totals" in out and "count from step 5 on" in out and "the 6 rows metrics.jsonl kept" in out
    summary, expected = resumed.summary, uninterrupted.summary
    # The rows metrics.jsonl kept stand in for the losses and evaluations; what was not counted is None, not a part.
    for key in CLOSE:
        assert summary[key] == pytest.approx(expected[key], rel=1e-6), key
    assert summary["tokens"] is summary["runtime_seconds"] is summary["tokens_per_second"] is None
    assert summary["segments"] == 2 and summary["segment_tokens_per_second"] > 0
    assert "tokens, samples and time before step 5 were not counted" in out
    assert "predates run totals" in analyse(load_run(run_dir))["segments"]["text"]


def test_health_state_round_trips_best_evaluation_and_early_stopping() -> None:
    evals = [{"step": 2, "val_loss": 2.0}, {"step": 4, "val_loss": 1.5}, {"step": 6, "val_loss": 1.7}]
    whole, first = HealthMonitor(early_stopping_patience=2), HealthMonitor(early_stopping_patience=2)
    for row in evals:
        whole.on_eval_row(row)
    for row in evals[:2]:
        first.on_eval_row(row)
    resumed = HealthMonitor(early_stopping_patience=2)
    resumed.load_state_dict(first.state_dict())
    resumed.on_eval_row(evals[2])
    assert resumed.best_eval == whole.best_eval == {"step": 4, "val_loss": 1.5}
    assert not resumed.should_stop
    whole.on_eval_row({"step": 8, "val_loss": 1.8})
    resumed.on_eval_row({"step": 8, "val_loss": 1.8})
    assert resumed.should_stop and whole.should_stop  # the second evaluation without improvement, in both


def test_a_checkpoint_between_logging_steps_keeps_its_window(tmp_path: Path, tiny_model_dir: Path,
                                                             dataset: Path) -> None:
    """Saved at step 6 inside the logging window 5-8: the resumed run's row at step 8 is the uninterrupted run's,
    not the mean of steps 7-8 alone, and so is the run's mean train loss."""
    settings = dict(max_steps=12, logging_steps=4, save_steps=6, eval_split_ratio=0.0)
    whole = train(config(dataset, tiny_model_dir, tmp_path / "whole" / "run", **settings))
    interrupted(whole.run_dir, tmp_path / "part" / "run", at=6, in_place=False)
    resumed = train(config(dataset, tiny_model_dir, tmp_path / "part" / "run", resume_from_checkpoint="latest",
                           **settings))

    def rows(result) -> dict[int, dict]:
        return {row["step"]: row for row in result.history if row["type"] == "train"}

    expected, got = rows(whole), rows(resumed)
    assert sorted(got) == [4, 8, 12]  # step 4's row came with the checkpoint
    for step in got:
        for key in ("loss", "token_accuracy"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6), (step, key)
    assert resumed.summary["mean_train_loss"] == pytest.approx(whole.summary["mean_train_loss"], rel=1e-6)


def test_a_step_cut_short_by_out_of_memory_leaves_the_saved_window_whole(tmp_path: Path, tiny_model_dir: Path,
                                                                         dataset: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory in step 3's second micro-batch: the checkpoint of step 2 holds the window of steps 1-2 only, so
    the resumed run's row at step 4 is the uninterrupted run's (step 3's first micro-batch is not counted twice)."""
    from lamelm_fast.train import TrainingStopped
    from lamelm_fast.train import model as model_module

    settings = dict(max_steps=4, logging_steps=4, save_steps=100, eval_split_ratio=0.0, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2)
    whole = train(config(dataset, tiny_model_dir, tmp_path / "whole" / "run", **settings))
    real, calls = model_module.causal_lm_loss, {"count": 0}

    def out_of_memory_in_step_3(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "causal_lm_loss", out_of_memory_in_step_3)
    with pytest.raises(TrainingStopped):
        train(config(dataset, tiny_model_dir, tmp_path / "part" / "run", **settings))
    monkeypatch.setattr(model_module, "causal_lm_loss", real)
    resumed = train(config(dataset, tiny_model_dir, tmp_path / "part" / "run", resume_from_checkpoint="latest",
                           **settings))
    expected = [row["loss"] for row in whole.history if row["type"] == "train"]
    assert [row["loss"] for row in resumed.history if row["type"] == "train"] == pytest.approx(expected, rel=1e-6)


# A constant learning rate, so that the first 4 steps of a 6-step run are those of a 4-step one.
EXTENDABLE = dict(max_steps=4, save_steps=2, lr_scheduler_type="constant", warmup_ratio=0.0)


@pytest.fixture(scope="module")
def longer(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset: Path):
    """EXTENDABLE's run to step 6 in one go, read by the tests, never changed."""
    return train(config(dataset, tiny_model_dir, tmp_path_factory.mktemp("longer") / "run",
                        **{**EXTENDABLE, "max_steps": 6}))


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "checkpoint copied to a new directory"])
def test_a_finished_run_extended_keeps_its_final_evaluation(tmp_path: Path, tiny_model_dir: Path, dataset: Path,
                                                            longer, in_place: bool) -> None:
    """The final checkpoint is saved after the final evaluation, so a finished run extended from it (a higher
    --max-steps) logs the evaluation at its old final step, and its totals count it: as the longer run does."""
    finished = train(config(dataset, tiny_model_dir, tmp_path / "finished", **EXTENDABLE))
    run_dir = finished.run_dir if in_place else tmp_path / "elsewhere"
    if not in_place:
        interrupted(finished.run_dir, run_dir, 4, in_place=False)
    extended = train(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint="latest",
                            **{**EXTENDABLE, "max_steps": 6}))
    rows = logged_rows(run_dir)
    assert [(row["type"], row["step"]) for row in rows if row["step"] >= 4] == [
        ("train", 4), ("eval", 4), ("train", 5), ("train", 6), ("eval", 6)]
    assert_same_rows(rows, logged_rows(longer.run_dir))
    assert_same_run(extended.summary, longer.summary)


def test_a_new_best_at_the_final_evaluation_is_saved_as_the_best_checkpoint(tmp_path: Path, tiny_model_dir: Path,
                                                                            dataset: Path) -> None:
    result = train(config(dataset, tiny_model_dir, tmp_path / "run", max_steps=4, save_steps=100,
                          early_stopping_patience=100, save_total_limit=1))
    assert result.summary["best_val_step"] == 4 and not result.summary["stopped_early"]
    assert result.summary["best_checkpoint"] == result.summary["checkpoint"] == str(result.run_dir / "checkpoint-4")
    assert [path.name for path in result.run_dir.glob("checkpoint-*")] == ["checkpoint-4"]  # the older best pruned


def test_a_checkpoint_carries_its_rows_in_a_file_of_its_own_that_its_manifest_covers(tmp_path: Path,
                                                                                    uninterrupted) -> None:
    saved = uninterrupted.run_dir / "checkpoint-4"
    lines = (uninterrupted.run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    packed = (saved / checkpoint_module.ROWS_FILE).read_bytes()
    assert gzip.decompress(packed).decode() == "".join(line for line in lines if json.loads(line)["step"] <= 4)
    assert checkpoint_module.ROWS_FILE in json.loads((saved / checkpoint_module.MANIFEST_FILE).read_text())["files"]
    state = checkpoint_module.load_training_state(saved)
    assert "history" not in state and state[checkpoint_module.LABELS_VERSION_KEY] == LABELS_VERSION

    run_dir = tmp_path / "run"  # a copy: the fixture's run serves other tests
    for step in (4, 8):
        shutil.copytree(uninterrupted.run_dir / f"checkpoint-{step}", run_dir / f"checkpoint-{step}")
    damaged = run_dir / "checkpoint-8" / checkpoint_module.ROWS_FILE
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    damaged.write_bytes(bytes(data))
    found = checkpoint_module.find_resume_checkpoint("latest", run_dir)
    assert found.path == run_dir / "checkpoint-4"
    assert found.notes == [f"{run_dir / 'checkpoint-8'} is damaged (metrics.jsonl.gz is corrupted (its SHA-256 does "
                           "not match the manifest)): skipped"]
    (run_dir / "checkpoint-4" / checkpoint_module.ROWS_FILE).unlink()
    assert checkpoint_module.verify_checkpoint(run_dir / "checkpoint-4") == "metrics.jsonl.gz is missing"


def test_a_checkpoint_of_the_previous_version_with_its_rows_in_the_training_state_resumes_elsewhere(
        tmp_path: Path, tiny_model_dir: Path, dataset: Path, uninterrupted) -> None:
    run_dir = tmp_path / "run"
    interrupted(uninterrupted.run_dir, run_dir, 4, in_place=False)
    as_saved_by_the_previous_version(run_dir / "checkpoint-4")
    train(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint="latest"))
    assert_same_rows(logged_rows(run_dir), logged_rows(uninterrupted.run_dir))
    assert (run_dir / "checkpoint-8" / checkpoint_module.ROWS_FILE).is_file()  # its own checkpoints: the new form


def test_a_checkpoint_without_rows_or_run_totals_resumed_elsewhere_does_not_say_the_summary_covers_the_run(
        tmp_path: Path, tiny_model_dir: Path, dataset: Path, uninterrupted, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    interrupted(uninterrupted.run_dir, run_dir, 4, in_place=False)
    without_rows(run_dir / "checkpoint-4", "report")
    capsys.readouterr()
    train(dataclasses.replace(config(dataset, tiny_model_dir, run_dir, resume_from_checkpoint="latest"), quiet=False))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  note: ")]
    no_rows = [note for note in notes if "carries no logged rows" in note]
    assert len(no_rows) == 1 and "start at step 5" in no_rows[0] and "covers the whole run" not in no_rows[0]
    assert [note for note in notes if "holds no run totals" in note and "count from step 5 on" in note]


def test_training_metrics_json_is_complete_at_each_checkpoint(tmp_path: Path, tiny_model_dir: Path, dataset: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Train rows rewrite it every few seconds at most (here: only the first); each checkpoint brings it up to date."""
    monkeypatch.setattr(logger_module, "METRICS_REWRITE_SECONDS", 1e9)
    steps_at_saves, save_checkpoint = [], checkpoint_module.save_checkpoint

    def reading_the_arrays(run_dir: Path, step: int, *args, **kwargs) -> Path:
        saved = save_checkpoint(run_dir, step, *args, **kwargs)
        steps_at_saves.append((step, json.loads((run_dir / "training_metrics.json").read_text())["steps"]))
        return saved

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", reading_the_arrays)
    train(config(dataset, tiny_model_dir, tmp_path / "run", max_steps=5, save_steps=2, eval_split_ratio=0.0))
    assert steps_at_saves == [(2, [1, 2]), (4, [1, 2, 3, 4]), (5, [1, 2, 3, 4, 5])]
