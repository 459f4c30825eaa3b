"""The training loop. The step is in :func:`train`; data, loss, metrics and checkpoints are called from it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as transformers_logging

from lamelm_fast.metrics import RunLogger
from lamelm_fast.ops.dispatch import BackendUnavailable, resolve_backend, use_backend
from lamelm_fast.optim import FusedAdamW, get_lr_scheduler
from lamelm_fast.train import checkpoint
from lamelm_fast.train.config import ConfigError, TrainConfig, resolve, validate
from lamelm_fast.train.data import DataOrder, Example, collate, iterate_batches, prepare_datasets
from lamelm_fast.train.model import (
    causal_lm_loss,
    load_model,
    load_model_config,
    load_tokenizer,
    model_context,
    pick_device,
)
from lamelm_fast.train.reporting import TrainingReport, WindowMetrics


class TrainingStopped(Exception):
    """The run ended early on purpose (interrupt, non-finite loss); the message says what to do next."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # logged train and eval rows
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


@dataclass
class Position:
    """Where the run is: the next optimizer step and the next micro-batch of the epoch order."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def training_windows(order: DataOrder, accumulation: int, start: Position) -> Iterator[tuple[int, int, list]]:
    """(epoch, next batch index, index lists of the window's micro-batches); windows never cross an epoch."""
    epoch, first = start.epoch, start.batch
    while True:
        batches = order.epoch(epoch)
        for begin in range(first, len(batches), accumulation):
            window = batches[begin:begin + accumulation]
            yield epoch, begin + len(window), window
        epoch, first = epoch + 1, 0


def make_optimizer(model: nn.Module, config: TrainConfig) -> FusedAdamW:
    # No weight decay on biases and norm gains (1-D), as in HF Trainer's default grouping for these models.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return FusedAdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                      weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm or None)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], config: TrainConfig, pad_token_id: int,
             device: torch.device, autocast_dtype: torch.dtype | None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    targets = 0
    for batch in iterate_batches(examples, config.per_device_eval_batch_size, config.packing, pad_token_id):
        loss, batch_correct = causal_lm_loss(model, batch.to(device), None, autocast_dtype)
        loss_sum += loss.float()
        correct += batch_correct.float()
        targets += batch.num_targets
    model.train(was_training)
    total, right = torch.stack([loss_sum, correct]).tolist()
    val_loss = total / max(targets, 1)
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
            "val_token_accuracy": right / max(targets, 1)}


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous.clear()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune as ``config`` says. Raises ConfigError for bad input before anything is written."""
    validate(config)
    with contextlib.nullcontext() if config.kernels == "auto" else use_backend(config.kernels):
        return _train(config)


def _train(config: TrainConfig) -> TrainResult:
    transformers_logging.disable_progress_bar()  # our own table reports progress
    tokenizer = load_tokenizer(config)
    model_config = load_model_config(config)
    config = resolve(config, model_context(model_config))
    train_set, eval_set, stats = prepare_datasets(
        config.dataset, config.dataset_split, config.dataset_format, tokenizer, config.max_seq_length,
        config.train_on_prompt, config.eval_split_ratio, config.seed)
    run_dir = Path(config.output_dir)
    resume_path = (checkpoint.resolve_resume_path(config.resume_from_checkpoint, run_dir)
                   if config.resume_from_checkpoint else None)
    device = pick_device()
    try:
        resolve_backend(device, has_cuda=True)
    except BackendUnavailable as error:
        raise ConfigError(f"--kernels {config.kernels}: {error}") from None
    loaded = load_model(config, model_config, device)
    model, autocast_dtype = loaded.model, loaded.autocast_dtype
    optimizer = make_optimizer(model, config)
    order = DataOrder(len(train_set), config.per_device_train_batch_size, config.shuffle, config.seed)
    steps_per_epoch = math.ceil(order.batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    warmup = config.warmup_steps or math.ceil(total_steps * config.warmup_ratio)
    scheduler = get_lr_scheduler(config.lr_scheduler_type, optimizer, warmup, total_steps)
    position = Position()
    torch.manual_seed(config.seed)
    if resume_path is not None:
        state = checkpoint.load_training_state(resume_path)
        checkpoint.load_weights(resume_path, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position = Position(**state["position"])
        checkpoint.set_rng_state(state["rng"])

    logger = RunLogger(run_dir, total_steps, quiet=config.quiet, log_format=config.log_format,
                       resume=resume_path is not None, report_to=config.report_to, config=dataclasses.asdict(config))
    total_params, trainable_params = loaded.parameter_counts()
    logger.say(_banner(config, stats, device, total_params, trainable_params, total_steps, loaded.notes,
                       resume_path))
    mean_length = stats.train_tokens / max(stats.train_examples, 1)
    report = TrainingReport(logger, model, model_config, device, mean_length, bool(eval_set), config.peak_tflops,
                            config.early_stopping_patience)
    result = TrainResult(run_dir, position.step)
    window = WindowMetrics(device)
    windows = training_windows(order, config.gradient_accumulation_steps, position)
    best_checkpoint, stopped_early = None, False
    epoch_progress = position.epoch + position.batch / order.batches_per_epoch

    def save(step: int) -> Path:
        state = _training_state(optimizer, scheduler, position, config)
        return checkpoint.save_checkpoint(run_dir, step, model, tokenizer, state, config.save_total_limit,
                                          keep=best_checkpoint)

    def run_eval(step: int, epoch: float) -> bool:
        return report.log_eval(window, step, epoch, lambda: evaluate(
            model, eval_set, config, tokenizer.pad_token_id, device, autocast_dtype))

    model.train()
    try:
        with _StopRequest() as stop:
            for step in range(position.step + 1, total_steps + 1):
                epoch, next_batch, indices = next(windows)
                micro_batches = [collate([train_set[i] for i in idx], config.packing, tokenizer.pad_token_id)
                                 for idx in indices]
                # Normalise by the label tokens of the whole window: the split into micro-batches is invisible.
                num_items = sum(b.num_targets for b in micro_batches)
                for batch in micro_batches:
                    loss, correct = causal_lm_loss(model, batch.to(device), num_items, autocast_dtype)
                    loss.backward()
                    window.add_micro_batch(loss, correct, batch)
                learning_rate = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                report.end_step(window, sum(b.num_tokens for b in micro_batches),
                                sum(b.num_sequences for b in micro_batches), step)
                position = _next_position(step, epoch, next_batch, order)
                epoch_progress = epoch + next_batch / order.batches_per_epoch
                result.global_step = step

                if step % config.logging_steps == 0 or step == total_steps:
                    expected = config.learning_rate * scheduler.lr_lambdas[0](step - 1)
                    fatal = report.log_train(window, optimizer.grad_norm, step, learning_rate, expected,
                                             epoch_progress)
                    if fatal is not None:
                        raise TrainingStopped(fatal.message, exit_code=1)
                if eval_set and config.eval_steps and step % config.eval_steps == 0 and step != total_steps:
                    if run_eval(step, epoch_progress) and config.early_stopping_patience:
                        best_checkpoint = result.checkpoint = save(step)
                    if report.health.should_stop:
                        stopped_early = True
                        break
                if (config.save_steps and step % config.save_steps == 0) or step == total_steps or stop.signal_name:
                    result.checkpoint = save(step)
                if stop.signal_name:
                    raise TrainingStopped(
                        f"{stop.signal_name} at step {step}: saved {result.checkpoint}; resume with the same "
                        f"command plus --resume-from-checkpoint {result.checkpoint}", exit_code=0)

        if eval_set and not stopped_early:
            run_eval(result.global_step, epoch_progress)
        result.summary = report.summary(result.global_step, result.checkpoint, best_checkpoint, stopped_early)
        logger.summary(result.summary)
        result.history = logger.history
    finally:
        report.close()
    return result


def _next_position(step: int, epoch: int, next_batch: int, order: DataOrder) -> Position:
    if next_batch >= order.batches_per_epoch:
        return Position(step, epoch + 1, 0)
    return Position(step, epoch, next_batch)


def _training_state(optimizer: FusedAdamW, scheduler: Any, position: Position, config: TrainConfig,
                    ) -> dict[str, Any]:
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "position": dataclasses.asdict(position), "config": dataclasses.asdict(config)}


def _banner(config: TrainConfig, stats: Any, device: torch.device, total: int, trainable: int, steps: int,
            notes: list[str], resume_path: Path | None) -> str:
    model_name = config.model or "embedded tiny Llama (lamelm_fast/assets/model)"
    lines = [
        f"lamelm-fast: {config.finetune} fine-tuning of {model_name} on {device.type}",
        f"  parameters: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable ({100 * trainable / total:.1f}%)",
        f"  data: {stats.source} ({stats.format}): {stats.records} records -> {stats.train_examples} train / "
        f"{stats.eval_examples} validation examples, {stats.train_tokens} train tokens",
        f"  truncated to {config.max_seq_length} tokens: {stats.truncated}; skipped (no target tokens): "
        f"{stats.skipped_no_targets}; packing {'on' if config.packing else 'off'}; loss on "
        f"{'all tokens' if config.train_on_prompt else 'responses only'}",
        f"  {steps} steps x {config.gradient_accumulation_steps} micro-batches of "
        f"{config.per_device_train_batch_size}; lr {config.learning_rate:g} ({config.lr_scheduler_type}); "
        f"clip {config.max_grad_norm:g}; run dir {config.output_dir}",
        *[f"  note: {note}" for note in notes],
    ]
    if resume_path is not None:
        lines.append(f"  resuming from {resume_path}")
    return "\n".join(lines)
