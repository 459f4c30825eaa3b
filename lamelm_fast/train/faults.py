"""What the loop does when a run goes wrong: out of memory, steps skipped for non-finite gradients, early stops."""

from __future__ import annotations

import gc
import traceback
from pathlib import Path

import torch

from lamelm_fast.train.config import TrainConfig


class TrainingStopped(Exception):
    """The run ended early on purpose (interrupt, non-finite loss, OOM, failed save); the message says what next."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def collective_failed(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective that failed because another rank is gone (torch's DistError family, or the
    plain RuntimeError that gloo raises on a closed connection)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo/transport",
                                         "NCCL communicator was aborted", "ProcessGroupNCCL"))


class StoppedAtOnce(KeyboardInterrupt):
    """A Ctrl-C once training started that the loop does not turn into a save: a second one (the first asks for a
    save), or one after the last step. Still a KeyboardInterrupt; it tells the command line that training started,
    so that a Ctrl-C before that is the only one reported as having nothing to save."""


class SkipStreak:
    """Consecutive optimizer steps skipped for a non-finite gradient, counted on the device (no host sync)."""

    def __init__(self, skipped_steps: torch.Tensor) -> None:
        self.skipped_steps = skipped_steps  # the optimizer's running count, updated in place by its step
        self.last = skipped_steps.clone()
        self.streak = torch.zeros_like(skipped_steps)

    def update(self) -> None:
        # A step adds 0 or 1 to the count: the streak grows by one or restarts from 0.
        self.streak.add_(1).mul_(self.skipped_steps - self.last)
        self.last.copy_(self.skipped_steps)


def skipped_steps_message(streak: int, step: int) -> str:
    return (f"{streak} optimizer steps in a row up to step {step} were skipped because the gradient was NaN or "
            "infinite, so the weights stopped changing. The last good checkpoint is kept; lower --learning-rate, "
            "keep --max-grad-norm on, check the data for corrupt examples, or try without --bf16.")


def free_memory(error: BaseException, optimizer: torch.optim.Optimizer) -> None:
    """Release what a failed step holds: the traceback's frames keep its activations alive."""
    traceback.clear_frames(error.__traceback__)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_message(step: int, config: TrainConfig, peak_gb: float, capacity_gb: float | None,
                          saved: Path | None, why_not_saved: str) -> str:
    """Where it ran out, the peak, the settings that lower memory (those not already at their frugal value)."""
    of = f" of {capacity_gb:.1f} GB" if capacity_gb else ""
    lower = [f"--per-device-train-batch-size (now {config.per_device_train_batch_size}; raise "
             "--gradient-accumulation-steps to keep the same global batch)",
             f"--max-seq-length (now {config.max_seq_length})"]
    if not config.gradient_checkpointing:
        lower.append("--gradient-checkpointing")
    else:
        if config.gradient_checkpointing_policy != "full":
            lower.append("--gradient-checkpointing-policy full")
        if config.gradient_checkpointing_every_n_layers > 1:
            lower.append("--gradient-checkpointing-every-n-layers 1")
    if not config.bf16 and config.finetune != "qlora":
        lower.append("--bf16")
    elif config.finetune == "full" and not config.bf16_weights:
        lower.append("--bf16-weights")
    if config.finetune == "full":
        lower.append("--finetune lora or qlora")
    elif config.finetune == "lora":
        lower.append("--finetune qlora")
    if config.distributed != "fsdp":
        lower.append("--distributed fsdp under torchrun with more GPUs")
    kept = f"saved {saved} (the last complete step)" if saved else f"nothing saved: {why_not_saved}"
    return (f"out of memory at step {step} (peak {peak_gb:.2f} GB{of}); {kept}. To fit, use "
            f"{', '.join(lower)}; then resume with --resume-from-checkpoint latest")
