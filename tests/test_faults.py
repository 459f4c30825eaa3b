"""Faults, simulated on the CPU: out of memory in the step, a full disk while saving, non-finite gradients."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import lamelm_fast.train.model as model_module
from lamelm_fast.optim import FusedAdamW
from lamelm_fast.train import TrainConfig, TrainingStopped, train
from lamelm_fast.train.checkpoint import list_checkpoints, verify_checkpoint
from lamelm_fast.train.cli import main


def config(model_dir: Path, dataset: Path, output_dir: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), output_dir=str(output_dir), finetune="full",
                  learning_rate=1e-3, max_seq_length=128, eval_split_ratio=0.0, logging_steps=1, quiet=True,
                  per_device_train_batch_size=4, max_steps=6, seed=3)
    return TrainConfig(**{**values, **overrides})


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int, error: Exception) -> None:
    """Make ``owner.name`` raise ``error`` on its ``call``-th call (1-based)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_out_of_memory_in_forward_saves_the_last_step_and_says_what_to_lower(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fail_on_call(monkeypatch, model_module, "causal_lm_loss", 3, torch.OutOfMemoryError("CUDA out of memory."))
    run = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--dataset", str(small_alpaca), "--output-dir", str(run), "--finetune",
            "full", "--max-steps", "6", "--max-seq-length", "128", "--eval-split-ratio", "0", "--quiet"]
    assert main(argv) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("stopped: out of memory at step 3 (peak ")
    for setting in ("--per-device-train-batch-size (now 4", "--max-seq-length (now 128)",
                    "--gradient-checkpointing", "--bf16", "--finetune lora or qlora"):
        assert setting in message
    assert f"saved {run / 'checkpoint-2'} (the last complete step)" in message
    assert list_checkpoints(run) == [run / "checkpoint-2"] and verify_checkpoint(run / "checkpoint-2") is None
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["position"]["step"] == 2


def test_out_of_memory_in_the_optimizer_update_saves_nothing(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_call(monkeypatch, FusedAdamW, "step", 2, torch.OutOfMemoryError("CUDA out of memory."))
    with pytest.raises(TrainingStopped) as stopped:
        train(config(tiny_model_dir, small_alpaca, tmp_path / "run"))
    assert stopped.value.exit_code == 1
    assert "nothing saved: the optimizer update was cut short" in str(stopped.value)
    assert list_checkpoints(tmp_path / "run") == []


@pytest.mark.parametrize("how", ["os", "torch"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    from collections import namedtuple

    from lamelm_fast.train import checkpoint as checkpoint_module

    real_save = torch.save

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        if ".checkpoint-4.tmp" in str(path):
            Path(path).write_bytes(b"partial")  # a half-written file, then the disk is full
            if how == "os":
                raise OSError(errno.ENOSPC, "No space left on device")
            # torch's own words for it (its zip writer), with next to nothing free
            usage = namedtuple("usage", "total used free")
            monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 5 * 10**7))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2368 vs 2256")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(config(tiny_model_dir, small_alpaca, run, save_steps=2, save_total_limit=1))
    message = str(stopped.value)
    assert stopped.value.exit_code == 1 and "\n" not in message
    assert "could not save" in message
    assert ("No space left on device" in message if how == "os"
            else "(the disk is full: [enforce fail" in message and "0.05 GB free" in message)
    assert f"the previous checkpoint {run / 'checkpoint-2'} is intact" in message
    assert list_checkpoints(run) == [run / "checkpoint-2"] and verify_checkpoint(run / "checkpoint-2") is None
    assert not list(run.glob(".checkpoint-*"))  # the temporary directory is gone


def test_disk_full_at_the_first_save_says_to_run_again(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if ".checkpoint-2.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingStopped) as stopped:
        train(config(tiny_model_dir, small_alpaca, tmp_path / "run", save_steps=2))
    message = str(stopped.value)
    assert "no earlier checkpoint exists" in message and message.endswith("then run the same command again")


class _NonFiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward: the gradient is poisoned, the loss is not."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_consecutive_skipped_steps_stop_the_run_at_a_logging_step(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = model_module.causal_lm_loss
    calls = {"n": 0}

    def poisoned_from_step_3(*args, **kwargs):
        loss, correct = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (_NonFiniteGradient.apply(loss) if calls["n"] >= 3 else loss), correct

    monkeypatch.setattr(model_module, "causal_lm_loss", poisoned_from_step_3)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(config(tiny_model_dir, small_alpaca, run, logging_steps=2, max_steps=20,
                     max_consecutive_skipped_steps=3))
    assert stopped.value.exit_code == 1
    assert str(stopped.value).startswith("4 optimizer steps in a row up to step 6 were skipped")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["type"] == "train"]
    assert [(row["step"], row["skipped_steps"]) for row in train_rows] == [(2, 0), (4, 2), (6, 4)]
    assert all(row["loss"] == row["loss"] for row in train_rows)  # finite losses all along: only gradients broke
    assert [row["check"] for row in rows if row["type"] == "warning"] == ["nonfinite_gradients"]


@pytest.mark.parametrize("at_step", [2, 3], ids=["before the last step", "in the last step"])
def test_a_stop_request_saves_and_says_resume_unless_the_run_is_complete(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], at_step: int) -> None:
    """SIGTERM during a step: the run saves after it and says how to resume; during the last step there is nothing
    left to resume, so the run ends as a complete one (its summary written, exit 0, no resume advice)."""
    import os
    import signal

    real_step = FusedAdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # (handled by the loop: it finishes the step)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(FusedAdamW, "step", step)
    run = tmp_path / "run"
    cfg = config(tiny_model_dir, small_alpaca, run, max_steps=3)
    if at_step < 3:
        with pytest.raises(TrainingStopped, match=f"SIGTERM at step {at_step}: saved .*--resume-from-checkpoint"):
            train(cfg)
        assert list_checkpoints(run) == [run / f"checkpoint-{at_step}"] and not (run / "summary.json").exists()
    else:
        result = train(cfg)
        assert result.global_step == 3 and result.summary and (run / "summary.json").is_file()
        assert list_checkpoints(run) == [run / "checkpoint-3"]
    assert "SIGTERM: stopping after the current step and saving a checkpoint" in capsys.readouterr().err
