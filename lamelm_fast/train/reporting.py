"""What the loop reports at logging and eval steps: window metrics, throughput and MFU, GPU monitor, health
checks and early stopping, all handed to the RunLogger. The loop calls this; it does not weave it in."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamelm_fast.metrics import RunLogger
from lamelm_fast.metrics.gpu import GpuMonitor, torch_peak_memory_gb
from lamelm_fast.metrics.health import HealthMonitor, HealthWarning
from lamelm_fast.metrics.throughput import count_parameters, flops_per_token, mfu, peak_flops
from lamelm_fast.train.data import Batch
from lamelm_fast.train.faults import SkipStreak, skipped_steps_message


def _no_reduction(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class WindowMetrics:
    """Sums over a logging window. Device values stay on device until :meth:`read` (one sync).

    ``reduce`` sums a tensor across ranks (under torchrun): loss, correct tokens and counts are summed at logging
    steps only, so each rank's sums are of its own share.
    """

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduction) -> None:
        self.device = device
        self.reduce = reduce
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.steps = self.tokens = self.targets = self.sequences = 0
        self.started = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, correct: torch.Tensor, batch: Batch) -> None:
        self.loss += loss.detach().float()
        self.correct += correct.detach().float()
        self.tokens += batch.num_tokens
        self.targets += batch.num_targets
        self.sequences += batch.num_sequences

    def read(self, grad_norm: torch.Tensor | None, skips: SkipStreak) -> dict[str, float]:
        """The window over all ranks, and the last step's grad norm and skip counts (already global)."""
        counts = torch.tensor([self.tokens, self.targets, self.sequences], dtype=torch.float64, device=self.device)
        sums = self.reduce(torch.cat([torch.stack([self.loss, self.correct]).double(), counts]))
        norm = grad_norm if grad_norm is not None else torch.full((), math.nan, device=self.device)
        last = torch.stack([norm.double(), skips.streak.double(), skips.skipped_steps.double()])
        loss, correct, tokens, targets, sequences, norm_value, streak, skipped = torch.cat([sums, last]).tolist()
        return {"loss": loss / max(self.steps, 1), "token_accuracy": correct / max(targets, 1),
                "grad_norm": norm_value, "tokens": tokens, "sequences": sequences, "skip_streak": streak,
                "skipped_steps": skipped}


class SilentLogger:
    """Stands in for the RunLogger on ranks other than 0: under torchrun only rank 0 prints and writes files."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        pass

    def progress(self, step: int) -> None:
        pass

    def train_row(self, row: dict[str, Any]) -> None:
        self.history.append({"type": "train", **row})

    def eval_row(self, row: dict[str, Any]) -> None:
        self.history.append({"type": "eval", **row})

    def sample_rows(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.history.extend({"type": "sample", "step": step, **row} for row in rows)

    def warning(self, step: int, check: str, message: str) -> None:
        self.history.append({"type": "warning", "step": step, "check": check, "message": message})

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak tensor memory on CUDA; on the CPU the process's peak resident memory (what the OS had to give)."""
    cuda = torch_peak_memory_gb(device)
    if cuda is not None:
        return cuda
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / (1e9 if sys.platform == "darwin" else 1e6)  # macOS reports bytes, Linux kilobytes


class TrainingReport:
    def __init__(self, logger: RunLogger | SilentLogger, model: nn.Module, model_config: Any, device: torch.device,
                 mean_sequence_length: float, has_eval: bool, peak_tflops: float | None,
                 early_stopping_patience: int | None, max_consecutive_skipped_steps: int = 0,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduction) -> None:
        self.logger = logger
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.reduce = reduce
        self.device = device
        self.gpu = GpuMonitor(device.index if device.type == "cuda" else None) if device.type == "cuda" else None
        if self.gpu is not None:
            self.gpu.start()
        device_name = self.gpu.name if self.gpu is not None and self.gpu.available else (
            torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        self.peak_flops = peak_flops(device_name, peak_tflops)
        trainable, frozen, embedding = count_parameters(model)
        self.flops_per_token = flops_per_token(model_config, trainable, frozen, embedding, mean_sequence_length)
        self.health = HealthMonitor(has_eval=has_eval, early_stopping_patience=early_stopping_patience)
        self.run_started = time.perf_counter()
        self.run_tokens = self.run_samples = 0

    def end_step(self, window: WindowMetrics, tokens: int, samples: int, step: int) -> None:
        window.steps += 1
        self.run_tokens += tokens
        self.run_samples += samples
        self.logger.progress(step)

    def _warn(self, warnings: list[HealthWarning]) -> HealthWarning | None:
        for warning in warnings:
            self.logger.warning(warning.step, warning.check, warning.message)
        return next((w for w in warnings if w.fatal), None)

    def log_train(self, window: WindowMetrics, grad_norm: torch.Tensor | None, skips: SkipStreak, step: int,
                  learning_rate: float, expected_learning_rate: float, epoch: float) -> HealthWarning | None:
        """Reads the window (the one device sync of a logging step); returns a fatal health warning, if any."""
        values = window.read(grad_norm, skips)
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        tokens_per_second = values["tokens"] / elapsed
        gpu = self.gpu.window() if self.gpu is not None else {}
        row = {"step": step, "loss": values["loss"], "grad_norm": values["grad_norm"],
               "learning_rate": float(learning_rate), "epoch": epoch, "token_accuracy": values["token_accuracy"],
               "tokens_per_second": tokens_per_second, "samples_per_second": values["sequences"] / elapsed,
               "mfu": mfu(tokens_per_second, self.flops_per_token, self.peak_flops),
               "memory_gb": peak_memory_gb(self.device), "skipped_steps": int(values["skipped_steps"]), **gpu}
        self.logger.train_row(row)
        window.reset()
        warnings = self.health.on_train_row(row, expected_lr=expected_learning_rate)
        streak = values["skip_streak"]
        if self.max_consecutive_skipped_steps and streak >= self.max_consecutive_skipped_steps:
            warnings.append(HealthWarning("nonfinite_gradients", step, skipped_steps_message(int(streak), step),
                                          fatal=True))
        return self._warn(warnings)

    def log_eval(self, window: WindowMetrics, step: int, epoch: float, evaluate: Any, sample: Any = None) -> bool:
        """Runs ``evaluate()`` and ``sample()`` (completions to log) and logs them; none of it counts as training time.
        True when the evaluation set a new best validation loss."""
        started = time.perf_counter()
        row = {"step": step, "epoch": epoch, **evaluate()}
        samples = sample() if sample is not None else []
        previous_best = self.health.best_eval
        self.logger.eval_row(row)  # redraws the plots: part of the evaluation's time too
        self.logger.sample_rows(step, samples)
        window.started += time.perf_counter() - started  # tokens/s measures training, not evaluation
        self._warn(self.health.on_eval_row(row))
        return self.health.best_eval is not previous_best and self.health.best_eval is not None

    def summary(self, global_step: int, checkpoint: Path | None, best_checkpoint: Path | None,
                stopped_early: bool) -> dict[str, Any]:
        history = self.logger.history
        losses = [row["loss"] for row in history if row["type"] == "train"]
        evals = [row for row in history if row["type"] == "eval"]
        best = min(evals, key=lambda row: row["val_loss"], default=None)
        runtime = time.perf_counter() - self.run_started
        run_tokens, run_samples = self.reduce(torch.tensor([self.run_tokens, self.run_samples], dtype=torch.float64,
                                                           device=self.device)).tolist()
        tokens_per_second = run_tokens / max(runtime, 1e-9)
        return {
            "steps": global_step,
            "stopped_early": stopped_early,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "mean_train_loss": sum(losses) / len(losses) if losses else None,
            "best_val_loss": best["val_loss"] if best else None,
            "best_val_step": best["step"] if best else None,
            "final_val_perplexity": evals[-1]["val_perplexity"] if evals else None,
            "runtime_seconds": runtime,
            "samples_per_second": run_samples / max(runtime, 1e-9),
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(tokens_per_second, self.flops_per_token, self.peak_flops),
            "peak_memory_gb": peak_memory_gb(self.device),
            "warnings": len([row for row in history if row["type"] == "warning"]),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "best_checkpoint": str(best_checkpoint) if best_checkpoint else None,
        }

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.stop()
        self.logger.close()
