"""What the loop reports at logging and eval steps: window metrics, throughput and MFU, GPU monitor, health
checks and early stopping, all handed to the RunLogger. The loop calls this; it does not weave it in."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
    steps only, so each rank's sums are of its own share. A step's micro-batches join the window when the step is
    done (:meth:`end_step`): a step cut short (out of memory) leaves the window as its last complete step left it.
    """

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduction) -> None:
        self.device = device
        self.reduce = reduce
        self._step_sums = torch.zeros(2, device=device)  # the running step's loss and correct tokens
        self._step_counts = [0, 0, 0]  # its tokens, targets, sequences
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, device=self.device)  # loss (summed over steps), correct tokens
        self.steps = self.tokens = self.targets = self.sequences = 0
        self.started = time.perf_counter()
        self.input_seconds = 0.0  # host time making the window's batches (:meth:`preparing_input`)

    @contextlib.contextmanager
    def preparing_input(self) -> Iterator[None]:
        """Times the loop's making of the next step's batches (choosing the examples, collating): the window's
        ``input_share``, which tells an input-bound run from one whose GPU waits for kernel launches."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.input_seconds += time.perf_counter() - began

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside is left out of the window's time (evaluation, checkpoints): tokens/s measures training."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began

    def add_micro_batch(self, loss: torch.Tensor, correct: torch.Tensor, batch: Batch) -> None:
        self._step_sums += torch.stack([loss.detach().float(), correct.detach().float()])
        for index, count in enumerate((batch.num_tokens, batch.num_targets, batch.num_sequences)):
            self._step_counts[index] += count

    def end_step(self) -> None:
        self.sums += self._step_sums
        self._step_sums.zero_()
        tokens, targets, sequences = self._step_counts
        self.tokens, self.targets, self.sequences = (self.tokens + tokens, self.targets + targets,
                                                     self.sequences + sequences)
        self._step_counts = [0, 0, 0]
        self.steps += 1

    def _global_sums(self) -> torch.Tensor:
        """[loss, correct, tokens, targets, sequences] of the window over all ranks (a reduce; not read yet)."""
        counts = torch.tensor([self.tokens, self.targets, self.sequences], dtype=torch.float64, device=self.device)
        return self.reduce(torch.cat([self.sums.double(), counts]))

    def state_dict(self) -> dict[str, float]:
        """The window so far, over all ranks (a checkpoint at a step that is not a logging step falls inside one; every
        rank calls it)."""
        names = ("loss", "correct", "tokens", "targets", "sequences")
        return {**dict(zip(names, self._global_sums().tolist(), strict=True)),
                "steps": self.steps, "seconds": time.perf_counter() - self.started,
                "input_seconds": self.input_seconds}

    def load_state_dict(self, state: dict[str, float] | None, holds_sums: bool) -> None:
        """Continue the window a checkpoint was saved in (None: from an older version, start afresh). The sums are
        global: ``holds_sums`` on one rank only, so that the logging step's reduce counts them once."""
        if state is None:
            return
        share = 1.0 if holds_sums else 0.0
        self.sums = torch.tensor([state["loss"] * share, state["correct"] * share], device=self.device)
        self.tokens, self.targets, self.sequences = (int(state[key] * share) for key in ("tokens", "targets",
                                                                                         "sequences"))
        self.steps = int(state["steps"])
        self.started = time.perf_counter() - state["seconds"]
        self.input_seconds = state.get("input_seconds", 0.0)

    def read(self, grad_norm: torch.Tensor | None, skips: SkipStreak) -> dict[str, float]:
        """The window over all ranks, and the last step's grad norm and skip counts (already global)."""
        sums = self._global_sums()
        norm = grad_norm if grad_norm is not None else torch.full((), math.nan, device=self.device)
        last = torch.stack([norm.double(), skips.streak.double(), skips.skipped_steps.double()])
        loss, correct, tokens, targets, sequences, norm_value, streak, skipped = torch.cat([sums, last]).tolist()
        return {"loss": loss / max(self.steps, 1), "token_accuracy": correct / max(targets, 1),
                "grad_norm": norm_value, "tokens": tokens, "sequences": sequences, "skip_streak": streak,
                "skipped_steps": skipped}


class CompileClock:
    """Host seconds spent in torch.compile (dynamo's compile callbacks, which also cover a backward compiled at its
    first call): taken out of the training window's time, so that tokens/s and MFU measure training, as they leave
    out evaluation. Read on the host: no device sync."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self.total = 0.0  # seconds compiled in this process, for the summary
        self._started = 0.0
        torch._dynamo.callback_handler.register_start_callback(self._start)
        torch._dynamo.callback_handler.register_end_callback(self._end)

    def _start(self, args: Any) -> None:
        self._started = time.perf_counter()

    def _end(self, args: Any) -> None:
        seconds = time.perf_counter() - self._started
        self._seconds += seconds
        self.total += seconds

    def take(self) -> float:
        """Seconds compiled since the last call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def close(self) -> None:
        torch._dynamo.callback_handler.remove_start_callback(self._start)
        torch._dynamo.callback_handler.remove_end_callback(self._end)


class SilentLogger:
    """Stands in for the RunLogger on ranks other than 0: under torchrun only rank 0 prints and writes files."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        pass

    def alert(self, text: str) -> None:
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

    def flush(self) -> None:
        pass

    def packed_rows(self) -> None:
        return None  # rank 0 alone writes a checkpoint's rows

    def close(self) -> None:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak tensor memory on CUDA; on the CPU the process's peak resident memory (what the OS had to give)."""
    cuda = torch_peak_memory_gb(device)
    if cuda is not None:
        return cuda
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / (1e9 if sys.platform == "darwin" else 1e6)  # macOS reports bytes, Linux kilobytes


def _plus(total: int | float | None, value: int | float) -> int | float | None:
    return None if total is None else total + value  # None: not counted by the checkpoint this run resumed from


@dataclass
class RunTotals:
    """What the summary adds up over the whole run. Each checkpoint saves the totals up to its step, so that the
    summary of a resumed run covers every segment (a segment: the steps one process trained), not only its own."""

    segments: int = 0
    tokens: int | None = 0  # None: a checkpoint of an older version did not count it
    target_tokens: int | None = 0
    samples: int | None = 0
    runtime_seconds: float | None = 0.0  # each segment's own time up to its last checkpoint, summed
    train_rows: int = 0
    loss_sum: float = 0.0
    first_loss: float | None = None
    final_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    final_val_perplexity: float | None = None
    warnings: int = 0

    def add_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Fold in logged rows, oldest first."""
        for row in rows:
            if row["type"] == "train":
                self.train_rows += 1
                self.loss_sum += row["loss"]
                self.first_loss = row["loss"] if self.first_loss is None else self.first_loss
                self.final_loss = row["loss"]
            elif row["type"] == "eval":
                if self.best_val_loss is None or row["val_loss"] < self.best_val_loss:
                    self.best_val_loss, self.best_val_step = row["val_loss"], row["step"]
                self.final_val_perplexity = row["val_perplexity"]
            elif row["type"] == "warning":
                self.warnings += 1

    def add_segment(self, tokens: int, target_tokens: int, samples: int, runtime_seconds: float) -> None:
        self.segments += 1
        self.tokens = _plus(self.tokens, tokens)
        self.target_tokens = _plus(self.target_tokens, target_tokens)
        self.samples = _plus(self.samples, samples)
        self.runtime_seconds = _plus(self.runtime_seconds, runtime_seconds)


def _rate(count: float | None, seconds: float | None) -> float | None:
    return None if count is None or seconds is None else count / max(seconds, 1e-9)


class TrainingReport:
    def __init__(self, logger: RunLogger | SilentLogger, model: nn.Module, model_config: Any, device: torch.device,
                 attended_length: float, has_eval: bool, peak_tflops: float | None,
                 early_stopping_patience: int | None, max_consecutive_skipped_steps: int = 0,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduction, world_size: int = 1,
                 compiled: bool = False) -> None:
        self.logger = logger
        self.compile_clock = CompileClock() if compiled else None
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.reduce = reduce
        self.device = device
        self.gpu = GpuMonitor(device.index if device.type == "cuda" else None) if device.type == "cuda" else None
        if self.gpu is not None:
            self.gpu.start()
        device_name = self.gpu.name if self.gpu is not None and self.gpu.available else (
            torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        peak = peak_flops(device_name, peak_tflops)
        self.peak_flops = None if peak is None else peak * world_size  # the rates count every rank's tokens
        trainable, frozen, embedding = count_parameters(model)
        self.flops_per_token = flops_per_token(model_config, trainable, frozen, embedding, attended_length)
        self.health = HealthMonitor(has_eval=has_eval, early_stopping_patience=early_stopping_patience)
        self.run_started = time.perf_counter()
        # This process's segment of the run: its first step, what it trained (this rank's share), and the totals of
        # the segments before it (from the checkpoint it resumed from).
        self.first_step = 1
        self.tokens = self.target_tokens = self.samples = 0
        self.earlier = RunTotals()

    def resume(self, saved: dict[str, Any] | None, step: int) -> str | None:
        """Continue the whole run's totals and health checks from a checkpoint at ``step`` (its ``report`` entry);
        a note for the banner when the checkpoint has none."""
        self.first_step = step + 1
        if saved is not None:
            self.earlier = RunTotals(**saved["totals"])
            self.health.load_state_dict(saved["health"])
            return None
        # An older checkpoint: the rows of earlier segments that metrics.jsonl kept (in place) stand in for totals.
        earlier_rows = [row for row in self.logger.history if row["step"] <= step]
        self.earlier = RunTotals(segments=1, tokens=None, target_tokens=None, samples=None, runtime_seconds=None)
        self.earlier.add_rows(earlier_rows)
        return (f"the checkpoint holds no run totals (saved by an older version): the summary's token counts and "
                f"runtime count from step {step + 1} on, its losses, evaluations and warnings before step {step + 1} "
                f"come from the {len(earlier_rows)} rows metrics.jsonl kept, and the health checks start afresh")

    def end_step(self, window: WindowMetrics, batches: list[Batch], step: int) -> None:
        window.end_step()
        if self.compile_clock is not None:
            window.started += self.compile_clock.take()  # tokens/s measures training, not compiling
        self.tokens += sum(batch.num_tokens for batch in batches)
        self.target_tokens += sum(batch.num_targets for batch in batches)
        self.samples += sum(batch.num_sequences for batch in batches)
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
               "memory_gb": peak_memory_gb(self.device), "skipped_steps": int(values["skipped_steps"]),
               "input_share": min(window.input_seconds / elapsed, 1.0), **gpu}
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
        with window.paused():
            row = {"step": step, "epoch": epoch, **evaluate()}
            samples = sample() if sample is not None else []
            previous_best = self.health.best_eval
            self.logger.eval_row(row)  # redraws the plots: part of the evaluation's time too
            self.logger.sample_rows(step, samples)
        if self.compile_clock is not None:
            self.compile_clock.take()  # compiling for evaluation: already left out with it
        self._warn(self.health.on_eval_row(row))
        return self.health.best_eval is not previous_best and self.health.best_eval is not None

    def _segment(self) -> tuple[int, int, int, float]:
        """This segment's tokens, target tokens and samples over all ranks, and its runtime so far."""
        counts = torch.tensor([self.tokens, self.target_tokens, self.samples], dtype=torch.float64, device=self.device)
        tokens, target_tokens, samples = (int(value) for value in self.reduce(counts).tolist())
        return tokens, target_tokens, samples, time.perf_counter() - self.run_started

    def _totals(self, segment: tuple[int, int, int, float]) -> RunTotals:
        """The earlier segments' totals plus this one's rows (a resumed run's history may hold earlier rows too)."""
        totals = dataclasses.replace(self.earlier)
        totals.add_rows(row for row in self.logger.history if row["step"] >= self.first_step)
        totals.add_segment(*segment)
        return totals

    def state_dict(self) -> dict[str, Any]:
        """For a checkpoint: the run's totals so far and the health checks' state (every rank calls it: a reduce)."""
        return {"totals": dataclasses.asdict(self._totals(self._segment())), "health": self.health.state_dict()}

    def summary(self, global_step: int, checkpoint: Path | None, best_checkpoint: Path | None,
                stopped_early: bool) -> dict[str, Any]:
        """The whole run (every segment); the segment_* figures, MFU and peak memory are this process's own."""
        segment = self._segment()
        tokens, _, _, runtime = segment
        totals = self._totals(segment)
        segment_tokens_per_second = tokens / max(runtime, 1e-9)
        return {
            "steps": global_step,
            "stopped_early": stopped_early,
            "first_loss": totals.first_loss,
            "final_loss": totals.final_loss,
            "mean_train_loss": totals.loss_sum / totals.train_rows if totals.train_rows else None,
            "best_val_loss": totals.best_val_loss,
            "best_val_step": totals.best_val_step,
            "final_val_perplexity": totals.final_val_perplexity,
            "tokens": totals.tokens,
            "target_tokens": totals.target_tokens,
            "samples": totals.samples,
            "runtime_seconds": totals.runtime_seconds,
            "samples_per_second": _rate(totals.samples, totals.runtime_seconds),
            "tokens_per_second": _rate(totals.tokens, totals.runtime_seconds),
            "segments": totals.segments,
            "segment_first_step": self.first_step,
            "segment_runtime_seconds": runtime,
            "segment_tokens_per_second": segment_tokens_per_second,
            # --compile: the runtime above includes it (the logged rows' tokens/s do not)
            **({"segment_compile_seconds": self.compile_clock.total} if self.compile_clock is not None else {}),
            # Measured on this process's device: earlier segments may have run on another one.
            "mfu": mfu(segment_tokens_per_second, self.flops_per_token, self.peak_flops),
            "peak_memory_gb": peak_memory_gb(self.device),
            "warnings": totals.warnings,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "best_checkpoint": str(best_checkpoint) if best_checkpoint else None,
        }

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.stop()
        if self.compile_clock is not None:
            self.compile_clock.close()
        self.logger.close()
