"""The training loop. The step is in :func:`train`; data, loss, metrics, checkpoints and faults are called from it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as transformers_logging

from lamelm_fast.metrics import RunLogger
from lamelm_fast.ops.dispatch import ENV_VAR, BackendUnavailable, pinned_backend, resolve_backend, use_backend
from lamelm_fast.ops.lora4bit import reuse_adapter_casts
from lamelm_fast.optim import FusedAdamW, get_lr_scheduler
from lamelm_fast.train import checkpoint, distributed, faults
from lamelm_fast.train.config import (
    ConfigError,
    TrainConfig,
    checked,
    empty_validation_note,
    first_line,
    resolve,
    unused_settings,
    validate,
)
from lamelm_fast.train.data import (
    LABELS_VERSION,
    DataOrder,
    Example,
    attended_length,
    check_token_ids,
    collate,
    fingerprint,
    iterate_batches,
    pinned_template_clock,
    prepare_datasets,
    template_clock,
    writes_date,
)
from lamelm_fast.train.distributed import Distributed
from lamelm_fast.train.faults import SkipStreak, TrainingStopped
from lamelm_fast.train.hub import offline_for_this_run
from lamelm_fast.train.model import (
    CausalLMLoss,
    compile_decoder_layers,
    load_model,
    load_model_config,
    load_tokenizer,
    model_context,
    model_vocab_size,
)
from lamelm_fast.train.reporting import SilentLogger, TrainingReport, WindowMetrics, peak_memory_gb
from lamelm_fast.train.samples import generate_samples


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged row, a resumed run's earlier ones too
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


@dataclass
class Position:
    """Where the run is: the next optimizer step, and the next example of the epoch's order."""

    step: int = 0
    epoch: int = 0
    example: int = 0


def training_windows(order: DataOrder, accumulation: int, start: Position) -> Iterator[tuple[int, int, list]]:
    """(epoch, next example, index lists of the window's global micro-batches); windows never cross an epoch."""
    epoch, first = start.epoch, start.example
    while True:
        batches = order.epoch(epoch, first)
        for begin in range(0, len(batches), accumulation):
            window = batches[begin:begin + accumulation]
            yield epoch, min(first + (begin + len(window)) * order.batch_size, order.num_examples), window
        epoch, first = epoch + 1, 0


def make_optimizer(model: nn.Module, config: TrainConfig) -> FusedAdamW:
    # No weight decay on biases and norm gains (1-D), as in HF Trainer's default grouping for these models.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return FusedAdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                      weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm or None,
                      master_weights=True)  # fp32 copies of bf16 weights (--bf16-weights); fp32 ones need none


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], config: TrainConfig, pad_token_id: int,
             dist: Distributed) -> dict[str, float]:
    """Validation loss, perplexity and token accuracy; under torchrun each rank takes its share of every batch."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    correct = torch.zeros((), dtype=torch.float64, device=dist.device)
    targets = 0
    with reuse_adapter_casts():
        for batch in iterate_batches(examples, config.per_device_eval_batch_size * dist.world_size, config.packing,
                                     pad_token_id, dist.shard):
            loss, batch_correct = model(batch.to(dist.device), None)
            loss_sum += loss.double()
            correct += batch_correct.double()
            targets += batch.num_targets
    model.train(was_training)
    count = torch.tensor(float(targets), dtype=torch.float64, device=dist.device)
    total, right, targets = dist.sum(torch.stack([loss_sum, correct, count])).tolist()
    val_loss = total / max(targets, 1)
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
            "val_token_accuracy": right / max(targets, 1)}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _silent(text: str) -> None:
    pass


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, saves and exits cleanly. The first signal says so at
    once (an evaluation may take a while to finish); a second Ctrl-C stops at once, without saving."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._say = say

    def __enter__(self) -> _StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous.clear()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name
        self._say(f"{self.signal_name}: stopping after the current step and saving a checkpoint"
                  + (" (Ctrl-C again to stop now, without saving)" if signum == signal.SIGINT else ""))

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _restore(state: dict[str, Any], path: Path, optimizer: FusedAdamW, scheduler: Any, config: TrainConfig,
             total_steps: int, dist: Distributed) -> tuple[Position, list[str | None]]:
    """Optimizer, schedule, data position and RNG from a checkpoint's training state; the banner's notes."""
    optimizer.load_state_dict(dist.shard_optimizer_state(state["optimizer"], optimizer))
    for group in optimizer.param_groups:  # this run's clipping (checkpoint.RESUMED_WITH_NEW_VALUES)
        group["max_grad_norm"] = config.max_grad_norm or None
    learning_rate = config.learning_rate
    scheduler.load_state_dict(state["scheduler"])
    position = Position(**state["position"])
    notes = [checkpoint.restore_rng(state["rng"], dist.rank, dist.world_size)]
    if position.step >= total_steps:
        raise ConfigError(f"{path} is at step {position.step} and this run ends at step {total_steps}: nothing to "
                          "train; raise --max-steps (or --num-train-epochs) to continue it")
    if scheduler.base_lrs[0] != learning_rate:  # the restored schedule's peak wins, as in HF
        notes.append(f"the learning-rate schedule continues from {path} (peak {scheduler.base_lrs[0]:g}); "
                     f"--learning-rate {learning_rate:g} applies to new runs only")
    # The next step's LR from this run's schedule (its length may differ from the checkpoint's: a raised
    # --max-steps), not the one the checkpoint's schedule left in the optimizer. Equal when nothing changed.
    scheduler._last_lr = [base * fn(scheduler.last_epoch)
                          for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr, strict=True):
        group["lr"] = lr
    return position, notes


_ONE_RUN_AT_A_TIME = threading.Lock()


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune as ``config`` says. Raises ConfigError for bad input before anything is written. One run at a time
    per process: the kernel backend, the random number generator and the 4-bit loading are process-wide."""
    config = checked(config)
    validate(config)
    if not _ONE_RUN_AT_A_TIME.acquire(blocking=False):
        raise RuntimeError("train() is running in another thread of this process: runs share the process's kernel "
                           "backend and random number generator, so two at once would change each other's numbers. "
                           "Run them one after another, or in separate processes")
    try:
        return _train_once(config)
    finally:
        _ONE_RUN_AT_A_TIME.release()


def _train_once(config: TrainConfig) -> TrainResult:
    with (contextlib.nullcontext() if config.kernels == "auto" else use_backend(config.kernels),
          offline_for_this_run(), _progress_bars_restored(), distributed.setup() as dist):
        try:
            return _train(config, dist)
        except RuntimeError as error:
            if dist.world_size > 1 and faults.collective_failed(error):  # a peer died (torchrun then stops this one)
                raise TrainingStopped(
                    f"another process of this run stopped or lost its connection ({first_line(error)}): this one "
                    f"stopped too, saving nothing more. Rerun the same command with --resume-from-checkpoint latest "
                    f"to continue from the last intact checkpoint in {config.output_dir}", exit_code=1) from None
            raise


@contextlib.contextmanager
def _progress_bars_restored() -> Iterator[None]:
    """transformers' and datasets' progress bars off for the run (our own table and banner report progress and what
    was loaded), back as they were after it."""
    enabled = transformers_logging.is_progress_bar_enabled()
    datasets = sys.modules.get("datasets")  # (imported by the run only for parquet, csv and hub datasets)
    datasets_enabled = datasets is None or datasets.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
        if datasets_enabled and "datasets" in sys.modules:
            sys.modules["datasets"].enable_progress_bars()


def _train(config: TrainConfig, dist: Distributed) -> TrainResult:
    run_dir = Path(config.output_dir)
    earlier_checkpoints = checkpoint.check_output_dir(run_dir, bool(config.resume_from_checkpoint),
                                                      config.overwrite_output_dir)
    tokenizer = load_tokenizer(config)
    model_config = load_model_config(config)
    config = resolve(config, model_context(model_config))
    resume = (checkpoint.find_resume_checkpoint(config.resume_from_checkpoint, run_dir)
              if config.resume_from_checkpoint else None)
    state = checkpoint.load_training_state(resume.path) if resume is not None else None
    later_checkpoints = [] if state is None else checkpoint.checkpoints_after(
        state["position"]["step"], run_dir, config.overwrite_output_dir)
    # A chat template that writes today's date (Llama 3.1+) writes the run's first day, on resume too (hence the
    # state read before tokenizing); a new run's is rank 0's, should its ranks start on either side of midnight.
    template_time = checkpoint.saved_template_time(state) or dist.from_main(template_clock())
    with pinned_template_clock(template_time):
        train_set, eval_set, stats = prepare_datasets(
            config.dataset, config.dataset_split, config.dataset_format, tokenizer, config.max_seq_length,
            config.train_on_prompt, config.eval_split_ratio, config.seed)
    check_token_ids([*train_set, *eval_set], model_vocab_size(model_config), tokenizer.pad_token_id)
    validation_note = empty_validation_note(config, len(train_set), len(eval_set))
    data_fingerprint = fingerprint(train_set, eval_set)
    device = dist.device
    try:
        resolve_backend(device, has_cuda=True)
    except BackendUnavailable as error:
        pinned = pinned_backend() if config.kernels == "auto" else None  # (--kernels other than auto pins it too)
        from_env = config.kernels == "auto" and not pinned and os.environ.get(ENV_VAR)
        if pinned:
            setting = (f"lamelm_fast.ops.dispatch.set_backend({pinned!r}) (pinned in this process, which --kernels "
                       "auto follows)")
        elif from_env:
            setting = f"{ENV_VAR}={os.environ[ENV_VAR]} (which --kernels auto follows)"
        else:
            setting = f"--kernels {config.kernels}"
        fix = "; or set_backend(None)" if pinned else f"; or unset {ENV_VAR}" if from_env else ""
        raise ConfigError(f"{setting}: {error}{fix}") from None
    loaded = load_model(config, model_config, device)
    notes: list[str | None] = [*loaded.notes, *unused_settings(config), validation_note]
    if config.eval_samples and dist.world_size > 1:
        notes.append("--eval-samples is off under torchrun: generation runs on one process")
    if resume is not None:
        notes += [*resume.notes, checkpoint.check_same_data(state, data_fingerprint, resume.path,
                                                            config.ignore_data_change, dataclasses.asdict(config),
                                                            writes_date(tokenizer, stats.format))]
        checkpoint.load_weights(resume.path, loaded.model)  # before wrapping: FSDP shards what is loaded
    total_params, trainable_params = loaded.parameter_counts()
    model, wrap_note = dist.wrap(CausalLMLoss(loaded.model, loaded.autocast_dtype), config)
    if config.compile:  # after wrapping: see compile_decoder_layers
        notes.append(compile_decoder_layers(loaded.model, device, build_mask_first=not loaded.varlen_attention))
    optimizer = make_optimizer(loaded.model, config)
    order = DataOrder(len(train_set), config.per_device_train_batch_size * dist.world_size, config.shuffle,
                      config.seed)
    steps_per_epoch = math.ceil(order.batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    warmup = config.warmup_steps or math.ceil(total_steps * config.warmup_ratio)
    scheduler = get_lr_scheduler(config.lr_scheduler_type, optimizer, warmup, total_steps)
    position = Position()
    torch.manual_seed(config.seed + dist.rank)  # each rank its own dropout masks; rank 0 those of one process
    if state is not None:
        position, restored = _restore(state, resume.path, optimizer, scheduler, config, total_steps, dist)
        notes += [*restored, *checkpoint.changed_settings_notes(state, dataclasses.asdict(config), resume.path,
                                                                position.step)]
    deleted = earlier_checkpoints or later_checkpoints  # (a fresh run may have the first, a resumed one the second)
    if dist.is_main and deleted:
        for path in deleted:
            shutil.rmtree(path)
        whose = "of an earlier run" if earlier_checkpoints else f"after {resume.path.name}, the one resumed"
        notes.append(f"--overwrite-output-dir: deleted {len(deleted)} checkpoint(s) {whose}")

    # The rows logged up to the checkpoint, for the main rank's logger; None: a checkpoint of an older version.
    carried = checkpoint.load_rows(resume.path, state) if state is not None and dist.is_main else None
    logger = RunLogger(run_dir, total_steps, quiet=config.quiet, log_format=config.log_format,
                       resume_step=position.step if resume else None, resume_rows=carried, report_to=config.report_to,
                       config=dataclasses.asdict(config)) if dist.is_main else SilentLogger()
    if state is not None and carried is None and not logger.history:
        # Without run totals either, the banner's next note says what the summary lacks.
        notes.append(f"{resume.path} carries no logged rows (saved by an older version) and {run_dir} holds none "
                     f"before step {position.step + 1}: this run directory's metrics.jsonl, curves and explain report "
                     f"start at step {position.step + 1}"
                     + ("; summary.json still covers the whole run" if "report" in state else ""))
    report = TrainingReport(logger, loaded.model, model_config, device, attended_length(train_set), bool(eval_set),
                            config.peak_tflops, config.early_stopping_patience, config.max_consecutive_skipped_steps,
                            dist.sum, dist.world_size, compiled=config.compile)
    best_checkpoint, stopped_early = None, False
    if state is not None:  # the summary and the health checks continue the whole run, not only this segment
        notes.append(report.resume(state.get("report"), position.step))
        best_checkpoint = _kept_best_checkpoint(report, run_dir, config)
    logger.say(_banner(config, stats, device, total_params, trainable_params, total_steps, dist.world_size,
                       [note for note in [*notes, wrap_note] if note], resume))
    for skipped in resume.notes if resume is not None else []:  # damaged checkpoints `latest` passed over
        logger.alert(f"note: {skipped}")
    result = TrainResult(run_dir, position.step, checkpoint=resume.path if resume else None)
    window = WindowMetrics(device, dist.sum)
    if state is not None:  # a checkpoint between logging steps: its window's first steps are in the checkpoint
        window.load_state_dict(state.get("window"), holds_sums=dist.is_main)
    skips = SkipStreak(optimizer.skipped_steps)
    windows = training_windows(order, config.gradient_accumulation_steps, position)
    epoch_progress = order.progress(position.epoch, position.example)

    def save(step: int, new_best: bool = False) -> Path:
        """Checkpoint this step; pruning spares the best checkpoint, unless this one replaces it as the best."""
        if result.checkpoint == run_dir / f"checkpoint-{step}":  # saved at this step already (best, then periodic)
            return result.checkpoint
        with window.paused():  # the next window's tokens/s measures training, not saving
            logger.flush()  # the run directory's training_metrics.json complete at each checkpoint
            state = {"optimizer": dist.full_optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                     "position": dataclasses.asdict(position), "config": dataclasses.asdict(config),
                     "data_fingerprint": data_fingerprint, checkpoint.LABELS_VERSION_KEY: LABELS_VERSION,
                     checkpoint.TEMPLATE_TIME: template_time.isoformat(),
                     "report": report.state_dict(), "window": window.state_dict()}
            result.checkpoint = checkpoint.save_checkpoint(run_dir, step, loaded.model, tokenizer, state, dist,
                                                           config.save_total_limit,
                                                           keep=None if new_best else best_checkpoint,
                                                           rows=logger.packed_rows())
        return result.checkpoint

    sample_set = eval_set[:config.eval_samples] if dist.world_size == 1 else []  # generation: one process

    def run_eval(step: int, epoch: float) -> bool:
        return report.log_eval(
            window, step, epoch, lambda: evaluate(model, eval_set, config, tokenizer.pad_token_id, dist),
            sample=(lambda: generate_samples(loaded.model, sample_set, tokenizer, loaded.autocast_dtype))
            if sample_set else None)

    @contextlib.contextmanager
    def out_of_memory_guard(step: int, weights_intact: bool) -> Iterator[None]:
        """Out of memory: free the step, save the last complete step if the weights are whole, say what to lower."""
        try:
            yield
        except torch.OutOfMemoryError as error:
            faults.free_memory(error, optimizer)
            can_save = weights_intact and dist.world_size == 1 and position.step > 0
            why = ("the optimizer update was cut short, so the weights are half-updated" if not weights_intact else
                   "the other ranks cannot join a save after one ran out of memory" if dist.world_size > 1 else
                   "no step was completed")
            capacity = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else None
            message = faults.out_of_memory_message(step, config, peak_memory_gb(device), capacity,
                                                   save(position.step) if can_save else None, why)
            raise TrainingStopped(message, exit_code=1) from None

    model.train()
    try:
        with _StopRequest(_stderr if dist.is_main else _silent) as stop:
            for step in range(position.step + 1, total_steps + 1):
                with window.preparing_input():
                    epoch, next_example, indices = next(windows)
                    micro_batches = [collate([train_set[i] for i in dist.shard(idx)], config.packing,
                                             tokenizer.pad_token_id) for idx in indices]
                # Normalise by the label tokens of the whole global window: the split into micro-batches and
                # ranks is invisible.
                num_items = sum(train_set[i].num_targets for idx in indices for i in idx)
                with out_of_memory_guard(step, weights_intact=True), reuse_adapter_casts():
                    for index, batch in enumerate(micro_batches):
                        with dist.gradient_sync(model, sync=index == len(micro_batches) - 1):
                            loss, correct = model(batch.to(device), num_items)
                            # DDP and FSDP average gradients over ranks, but each rank's loss is already its
                            # share of the global mean: scale the average back to the sum.
                            (loss * dist.world_size).backward()
                        window.add_micro_batch(loss, correct, batch)
                learning_rate = optimizer.param_groups[0]["lr"]
                with out_of_memory_guard(step, weights_intact=False):
                    optimizer.step()
                skips.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                report.end_step(window, micro_batches, step)
                position = _next_position(step, epoch, next_example, order)
                epoch_progress = order.progress(epoch, next_example)
                result.global_step = step

                if step % config.logging_steps == 0 or step == total_steps:
                    expected = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1)
                    fatal = report.log_train(window, optimizer.grad_norm, skips, step, learning_rate, expected,
                                             epoch_progress)
                    if fatal is not None:
                        raise TrainingStopped(fatal.message, exit_code=1)
                final = step == total_steps
                # The final evaluation comes before the final checkpoint, so that the checkpoint's rows, run totals
                # and health state hold it: a run extended from it logs what an uninterrupted longer run does.
                if eval_set and (final or (config.eval_steps and step % config.eval_steps == 0)):
                    if run_eval(step, epoch_progress) and config.early_stopping_patience:
                        best_checkpoint = save(step, new_best=True)
                    stopped_early = report.health.should_stop and not final  # the last step ends the run anyway
                stopping = dist.any(stop.signal_name is not None)  # every rank stops after the same step
                if (config.save_steps and step % config.save_steps == 0) or final or stopping or stopped_early:
                    save(step)  # (an early stop ends the run: its last step is saved as the final step is)
                if stopped_early:
                    break
                if stopping and not final:  # at the last step the run is complete: it ends as one
                    raise TrainingStopped(
                        f"{stop.signal_name or 'a signal to another rank'} at step {step}: saved {result.checkpoint}; "
                        f"resume with the same command plus --resume-from-checkpoint {result.checkpoint} (from "
                        "Python: the same TrainConfig with resume_from_checkpoint set to it)",
                        exit_code=0)

        result.summary = report.summary(result.global_step, result.checkpoint, best_checkpoint, stopped_early)
        logger.summary(result.summary)
        result.history = logger.history
    except KeyboardInterrupt as interrupt:  # marked, so that the command line does not call it one before training
        raise faults.StoppedAtOnce from interrupt
    finally:
        report.close()
    return result


def _kept_best_checkpoint(report: TrainingReport, run_dir: Path, config: TrainConfig) -> Path | None:
    """A resumed run's best checkpoint so far (early stopping saves one at each new best evaluation), so that
    pruning spares it and the summary names it; None when it is not in this run directory."""
    best = report.health.best_eval
    path = run_dir / f"checkpoint-{best['step']}" if best is not None and config.early_stopping_patience else None
    return path if path is not None and path.is_dir() else None


def _next_position(step: int, epoch: int, next_example: int, order: DataOrder) -> Position:
    if next_example >= order.num_examples:
        return Position(step, epoch + 1, 0)
    return Position(step, epoch, next_example)


def _banner(config: TrainConfig, stats: Any, device: torch.device, total: int, trainable: int, steps: int,
            world_size: int, notes: list[str], resume: checkpoint.ResumePoint | None) -> str:
    model_name = config.model or "embedded tiny Llama (lamelm_fast/assets/model)"
    ranks = f" x {world_size} processes" if world_size > 1 else ""
    lines = [
        f"lamelm-fast: {config.finetune} fine-tuning of {model_name} on {device.type}",
        f"  parameters: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable ({100 * trainable / total:.1f}%)",
        f"  data: {stats.source} ({stats.format}): {stats.records} records -> {stats.train_examples} train / "
        f"{stats.eval_examples} validation examples, {stats.train_tokens} train tokens",
        f"  truncated to {config.max_seq_length} tokens: {stats.truncated}; skipped (no target tokens): "
        f"{stats.skipped_no_targets}; packing {'on' if config.packing else 'off'}; loss on "
        f"{'all tokens' if config.train_on_prompt or stats.format == 'text' else 'responses only'}",
        f"  {steps} steps x {config.gradient_accumulation_steps} micro-batches of "
        f"{config.per_device_train_batch_size}{ranks}; lr {config.learning_rate:g} ({config.lr_scheduler_type}); "
        f"clip {config.max_grad_norm:g}; run dir {config.output_dir}",
        *[f"  note: {note}" for note in [*stats.notes, *notes]],
    ]
    if resume is not None:
        lines.append(f"  resuming from {resume.path}")
    return "\n".join(lines)
