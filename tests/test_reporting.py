"""What a run reports, end to end on real (tiny) runs: files, console modes, trackers, health, HF callback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ForkedCli, embedded_records, write_jsonl
from lamelm_fast.train import TrainConfig, TrainingStopped, train


def config_for(tmp_path: Path, model_dir: Path, dataset: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), finetune="full", learning_rate=1e-3,
                  max_seq_length=128, eval_split_ratio=0.0, logging_steps=1, output_dir=str(tmp_path / "run"),
                  quiet=True, seed=3, warmup_ratio=0.0)
    values.update(overrides)
    return TrainConfig(**values)


def warning_checks(run_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["check"] for row in rows if row["type"] == "warning"]


def test_healthy_run_writes_every_file_and_warns_nothing(
        embedded_default_cli_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    # The embedded default's own recipe, shortened: no false alarms on a healthy run. (The run is shared with
    # test_config.py's CLI test: conftest's embedded_default_cli_run.)
    completed, run = embedded_default_cli_run
    assert completed.returncode == 0, completed.stderr
    assert warning_checks(run) == []
    arrays = json.loads((run / "training_metrics.json").read_text())
    assert arrays["steps"] == list(range(5, 61, 5))
    assert len(arrays["train_loss"]) == len(arrays["val_loss"]) == len(arrays["learning_rate"]) == 12
    assert [s for s, v in zip(arrays["steps"], arrays["val_loss"], strict=True) if v is not None] == [20, 40, 60]
    for name in ("training_curve.png", "loss_by_epoch.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["warnings"] == 0 and summary["peak_memory_gb"] > 0.05 and summary["mfu"] is None  # CPU
    assert summary["tokens_per_second"] > 0 and summary["final_loss"] < summary["first_loss"]
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert len(rows) == 12
    assert all(r["gpu_util"] is None if "gpu_util" in r else True for r in rows)
    assert all(0 < r["token_accuracy"] < 1 and r["samples_per_second"] > 0 and 0 <= r["input_share"] < 1
               for r in rows)


def test_input_share_is_the_time_the_loop_spends_making_batches(tmp_path: Path, tiny_model_dir: Path,
                                                               small_alpaca: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow collation (0.3 s per micro-batch, far above a tiny model's step) makes up most of each window."""
    import time

    from lamelm_fast.train import loop

    collate = loop.collate

    def slow_collate(*args, **kwargs):
        time.sleep(0.3)
        return collate(*args, **kwargs)

    monkeypatch.setattr(loop, "collate", slow_collate)
    train(config_for(tmp_path, tiny_model_dir, small_alpaca, max_steps=3, per_device_train_batch_size=2))
    rows = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]
    assert len(rows) == 3 and all(0.4 < r["input_share"] <= 1 for r in rows), [r["input_share"] for r in rows]


def test_checkpoint_saving_is_left_out_of_tokens_per_second(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow save (3 s, far above a tiny model's step) after every step: no window's time holds it, as none holds
    an evaluation."""
    import time

    from lamelm_fast.train import checkpoint

    save_checkpoint = checkpoint.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(3.0)
        return save_checkpoint(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    train(config_for(tmp_path, tiny_model_dir, small_alpaca, max_steps=3, per_device_train_batch_size=2,
                     save_steps=1, packing=False))
    rows = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]
    seconds = [2 / r["samples_per_second"] for r in rows]  # a window: one step of 2 unpacked sequences
    assert len(rows) == 3 and all(0 < s < 1.5 for s in seconds[1:]), seconds  # (windows 2 and 3 follow a save)


def test_learning_rate_10_warns_of_exploding_gradients(tmp_path: Path, tiny_model_dir: Path,
                                                        small_alpaca: Path) -> None:
    config = config_for(tmp_path, tiny_model_dir, small_alpaca, learning_rate=10.0, max_steps=8,
                        per_device_train_batch_size=4)
    try:
        train(config)
    except TrainingStopped as stop:
        assert stop.exit_code == 1  # diverged all the way to NaN: stopped, last good checkpoint kept
    checks = warning_checks(Path(config.output_dir))
    assert checks and checks[0] == "exploding_gradients", checks


def test_learning_rate_0_warns_not_learning(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    config = config_for(tmp_path, tiny_model_dir, small_alpaca, learning_rate=0.0, lr_scheduler_type="constant",
                        max_steps=8, per_device_train_batch_size=4)
    train(config)
    assert warning_checks(Path(config.output_dir)) == ["not_learning"]


def test_overfitting_is_reported_and_early_stopping_keeps_the_best(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_jsonl(tmp_path / "d.jsonl", embedded_records(12))
    config = config_for(tmp_path, tiny_model_dir, dataset, learning_rate=3e-3, eval_split_ratio=0.25,
                        per_device_train_batch_size=3, num_train_epochs=200, logging_steps=3, eval_steps=3,
                        early_stopping_patience=3, save_total_limit=1)
    result = train(config)
    checks = warning_checks(result.run_dir)
    assert "overfitting" in checks and "exploding_gradients" not in checks
    summary = result.summary
    assert summary["stopped_early"] and summary["steps"] < 600
    best_step = summary["best_val_step"]
    assert summary["best_checkpoint"] == str(result.run_dir / f"checkpoint-{best_step}")
    assert (result.run_dir / f"checkpoint-{best_step}" / "model.safetensors").is_file()
    # The step the run stopped at is saved, as a final step is (a resume from `latest` continues there); with
    # --save-total-limit 1 the best is kept beside it (each new best replaced the previous one).
    assert summary["checkpoint"] == str(result.run_dir / f"checkpoint-{summary['steps']}")
    assert sorted(p.name for p in result.run_dir.glob("checkpoint-*")) == sorted(
        {f"checkpoint-{best_step}", f"checkpoint-{summary['steps']}"})
    evals = [r for r in result.history if r["type"] == "eval"]
    assert min(evals, key=lambda r: r["val_loss"])["step"] == best_step and evals[-1]["val_loss"] > summary[
        "best_val_loss"]


def test_planted_nan_stops_with_exit_1_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lamelm_fast.train.model as model_module

    calls = {"n": 0}
    real_loss = model_module.causal_lm_loss

    def poisoned(*args, **kwargs):
        loss, correct = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 5 else loss), correct

    monkeypatch.setattr(model_module, "causal_lm_loss", poisoned)
    config = config_for(tmp_path, tiny_model_dir, small_alpaca, max_steps=8, save_steps=2,
                        per_device_train_batch_size=4)
    with pytest.raises(TrainingStopped) as stopped:
        train(config)
    assert stopped.value.exit_code == 1 and "step 5" in str(stopped.value)
    assert warning_checks(Path(config.output_dir)) == ["nonfinite_loss"]
    assert sorted(p.name for p in Path(config.output_dir).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_json_lines_mode_and_tensorboard(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                         cli: ForkedCli) -> None:
    run = tmp_path / "run"
    completed = cli.run("--model", str(tiny_model_dir), "--dataset", str(small_alpaca), "--finetune", "full",
                        "--max-steps", "4", "--logging-steps", "2", "--eval-split-ratio", "0.2", "--log-format",
                        "json", "--report-to", "tensorboard", "--output-dir", str(run))
    assert completed.returncode == 0, completed.stderr
    rows = [json.loads(line) for line in completed.stdout.splitlines()]  # every stdout line is JSON
    assert [r["type"] for r in rows] == ["train", "train", "eval", "summary"]
    assert "lamelm-fast: full fine-tuning" in completed.stderr  # the banner goes to stderr in JSON mode
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4]
    assert [e.value for e in losses] == pytest.approx([rows[0]["loss"], rows[1]["loss"]], rel=1e-6)


def test_hf_callback_adds_throughput_and_health(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from lamelm_fast.integrations.hf import LamelmCallback

    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 200, (24, 33)).tolist()]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=6,
                             logging_steps=1, learning_rate=10.0, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, max_grad_norm=1.0)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=data)
    callback = LamelmCallback().install(trainer)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 6
    assert all(row["tokens_per_second"] > 0 for row in logged)  # 4 x 33 real tokens per step, timed
    assert callback.warnings and callback.warnings[0].check == "exploding_gradients"
    assert any("health_warnings" in row for row in logged)


def test_mfu_counts_the_attended_length_and_every_rank_device() -> None:
    """The attention term uses sum(L**2) / sum(L) (not the mean length), and the rates, which count every rank's
    tokens, are set against every rank's peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lamelm_fast.metrics.throughput import count_parameters, flops_per_token
    from lamelm_fast.train.data import Example, attended_length
    from lamelm_fast.train.reporting import SilentLogger, TrainingReport

    examples = [Example([1] * n, [True] * n) for n in (2, 4)]
    assert attended_length(examples) == (2 * 2 + 4 * 4) / (2 + 4)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    report = TrainingReport(SilentLogger(), model, config, torch.device("cpu"), attended_length(examples), False,
                            peak_tflops=2.0, early_stopping_patience=None, world_size=3)
    try:
        assert report.peak_flops == 3 * 2.0e12
        assert report.flops_per_token == flops_per_token(config, *count_parameters(model), 20 / 6)
    finally:
        report.close()
