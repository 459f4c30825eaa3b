"""``LamelmCallback``: real tokens/s, GPU utilisation, MFU and plain-words health warnings in any
``transformers.Trainer`` run's logs, computed by the same code our own loop uses."""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lamelm_fast.metrics.gpu import GpuMonitor
from lamelm_fast.metrics.health import HealthMonitor, HealthThresholds, HealthWarning
from lamelm_fast.metrics.throughput import count_parameters, flops_per_token, mfu, peak_flops

logger = logging.getLogger("lamelm_fast")


class LamelmCallback(TrainerCallback):
    """Add to a Trainer with ``LamelmCallback().install(trainer)`` (runs before the reporting integrations, so
    TensorBoard/W&B see our numbers) or ``Trainer(callbacks=[LamelmCallback()])``.

    Real tokens come from HF's own non-padding token count, which the callback switches on if it is off
    (HF reads that count from the device once per micro-batch)."""

    def __init__(self, peak_tflops: float | None = None, thresholds: HealthThresholds | None = None,
                 early_stopping_patience: int | None = None) -> None:
        self.peak_tflops = peak_tflops
        self.health = HealthMonitor(thresholds, has_eval=True, early_stopping_patience=early_stopping_patience)
        self.warnings: list[HealthWarning] = []
        self.gpu: GpuMonitor | None = None
        self._params: tuple[int, int, int] | None = None
        self._model_config: Any = None
        self._peak: float | None = None
        self._last_tokens = 0
        self._last_time = 0.0
        self._last_samples_step = 0

    def install(self, trainer: Trainer) -> LamelmCallback:
        trainer.callback_handler.callbacks.insert(0, self)
        self.on_init_end(trainer.args, trainer.state, trainer.control)
        return self

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if args.include_num_input_tokens_seen in ("no", False):
            args.include_num_input_tokens_seen = "non_padding"

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        import torch

        self.health.has_eval = args.eval_strategy != "no"
        if model is not None:
            self._params = count_parameters(model)
            self._model_config = model.config
        on_cuda = torch.cuda.is_available() and not args.use_cpu
        self.gpu = GpuMonitor() if on_cuda else None
        if self.gpu is not None:
            self.gpu.start()
        name = self.gpu.name if self.gpu is not None and self.gpu.available else (
            torch.cuda.get_device_name() if on_cuda else None)
        self._peak = peak_flops(name, self.peak_tflops)
        self._last_tokens, self._last_time = state.num_input_tokens_seen, time.perf_counter()
        self._last_samples_step = state.global_step

    def _report(self, warnings: list[HealthWarning], state: TrainerState, control: TrainerControl) -> None:
        for warning in warnings:
            self.warnings.append(warning)
            logger.warning("lamelm health (step %d): %s", warning.step, warning.message)
            if warning.fatal:
                control.should_training_stop = True
        if warnings and state.log_history:
            state.log_history[-1].setdefault("health_warnings", []).extend(w.message for w in warnings)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen - self._last_tokens
        steps = state.global_step - self._last_samples_step
        elapsed = max(now - self._last_time, 1e-9)
        self._last_tokens, self._last_time = state.num_input_tokens_seen, now
        self._last_samples_step = state.global_step
        sequences = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        added: dict[str, Any] = {"tokens_per_second": tokens / elapsed}
        if self._params is not None and tokens and sequences:
            per_token = flops_per_token(self._model_config, *self._params, seq_len=tokens / sequences)
            added["mfu"] = mfu(added["tokens_per_second"], per_token, self._peak)
        if self.gpu is not None:
            added.update(self.gpu.window())
        added = {key: value for key, value in added.items() if value is not None}
        logs.update(added)
        if state.log_history:
            state.log_history[-1].update(added)
        row = {"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm"),
               "learning_rate": logs.get("learning_rate"), "epoch": logs.get("epoch"), **added}
        self._report(self.health.on_train_row(row), state, control)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if metrics and "eval_loss" in metrics:
            self._report(self.health.on_eval_row({"step": state.global_step, "val_loss": metrics["eval_loss"]}),
                         state, control)
            if self.health.should_stop:
                control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.gpu is not None:
            self.gpu.stop()
