"""lamelm-fast in a ``transformers.Trainer`` run.

``LamelmCallback``: real tokens/s, GPU utilisation, MFU and plain-words health warnings in the Trainer's logs,
computed by the same code our own loop uses. ``fused_adamw_cls_and_kwargs`` / ``fused_adamw``: our FusedAdamW as the
Trainer's optimizer, configured from its ``TrainingArguments`` and grouped as the Trainer groups its own AdamW.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, ExportableState

from lamelm_fast.metrics.gpu import GpuMonitor
from lamelm_fast.metrics.health import HealthMonitor, HealthThresholds, HealthWarning
from lamelm_fast.metrics.throughput import count_parameters, flops_per_token, mfu, peak_flops
from lamelm_fast.optim import FusedAdamW

logger = logging.getLogger("lamelm_fast")


def fused_adamw_cls_and_kwargs(args: TrainingArguments, **options: Any) -> tuple[type[FusedAdamW], dict[str, Any]]:
    """``Trainer(optimizer_cls_and_kwargs=fused_adamw_cls_and_kwargs(args))``: FusedAdamW with the learning rate,
    betas, epsilon and weight decay of ``args``. The Trainer then builds it as its own AdamW: parameter groups without
    weight decay on biases and norm weights, created after FSDP wrapping, LR scheduler on top. ``options`` go to
    FusedAdamW (``master_weights``, ``stochastic_rounding``, ...).

    Clipping stays with the Trainer (``args.max_grad_norm``): in transformers >= 5.17 the Trainer computes the global
    norm (and logs it) every step even with ``max_grad_norm=0``, so FusedAdamW's own clipping would save nothing
    there. ``max_grad_norm=`` here is accepted only with ``args.max_grad_norm=0``, never twice.
    """
    if options.get("max_grad_norm") is not None and args.max_grad_norm > 0:
        raise ValueError(f"gradients would be clipped twice: TrainingArguments(max_grad_norm={args.max_grad_norm}) "
                         f"and FusedAdamW(max_grad_norm={options['max_grad_norm']}); keep one (the Trainer's is "
                         "enough: it also logs grad_norm)")
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
              "weight_decay": args.weight_decay, **options}
    return FusedAdamW, kwargs


def fused_adamw(model: nn.Module, args: TrainingArguments, **options: Any) -> FusedAdamW:
    """A FusedAdamW over ``model``'s trainable parameters, for ``Trainer(optimizers=(fused_adamw(model, args), None))``
    or a hand-written loop: the same groups and hyperparameters as :func:`fused_adamw_cls_and_kwargs` gives the Trainer
    (FSDP needs that form: the Trainer refuses a ready-made optimizer there)."""
    optimizer_cls, kwargs = fused_adamw_cls_and_kwargs(args, **options)
    # The Trainer's own rule (biases, LayerNorm and *norm weights); the method does not use its Trainer.
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
    return optimizer_cls(groups, **kwargs)


def sequence_length_sums(inputs: Mapping[str, Any]) -> Tensor | None:
    """``[sum(L), sum(L**2)]`` (int64, on the batch's device, no host sync) over the sequences of one model input,
    or None when ``inputs`` holds no batch shape.

    The sequences are found as the model sees them: ``cu_seq_lens_q`` (flash-attention varlen kwargs); else within
    each row, the real tokens (2-D ``attention_mask``) split where ``position_ids`` restart or jump (packed,
    padding-free rows, as HF's DataCollatorWithFlattening makes) or where ``seq_idx`` changes. ``sum(L**2) / sum(L)``
    is the attended length ``flops_per_token`` asks for.
    """
    cu_seq_lens = inputs.get("cu_seq_lens_q")
    if isinstance(cu_seq_lens, Tensor):
        lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
        return torch.stack([lengths.sum(), (lengths * lengths).sum()])
    ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    named = [inputs.get(key) for key in ("attention_mask", "position_ids", "seq_idx")]
    if isinstance(ids, Tensor) and ids.dim() == 2:
        shape = ids.shape
    elif isinstance(embeds, Tensor) and embeds.dim() == 3:
        shape = embeds.shape[:2]
    else:
        shape = next((t.shape for t in named if isinstance(t, Tensor) and t.dim() == 2), None)
        if shape is None:
            return None
    rows, columns = shape
    # Anything of another shape (a 4-D mask, 3-D mrope positions) is not read: counting must never break training.
    mask, positions, seq_idx = (t.expand(rows, columns) if isinstance(t, Tensor) and t.dim() == 2 and t.shape[-1]
                                == columns and t.shape[0] in (1, rows) else None for t in named)
    device = next(t.device for t in (ids, embeds, *named) if isinstance(t, Tensor))
    real = mask.bool() if mask is not None else torch.ones(rows, columns, dtype=torch.bool, device=device)
    if positions is None:
        positions = real.long().cumsum(-1) - 1  # what the model derives from the mask (left padding included)
    starts = torch.ones(rows, columns, dtype=torch.bool, device=device)
    starts[:, 1:] = (positions[:, 1:] != positions[:, :-1] + 1) | ~real[:, :-1]
    if seq_idx is not None:
        starts[:, 1:] |= seq_idx[:, 1:] != seq_idx[:, :-1]
    index = torch.arange(columns, device=device).expand(rows, columns)
    offset = index - torch.where(starts, index, 0).cummax(-1).values  # each token's index in its sequence
    # A sequence of length L holds offsets 0..L-1, and sum(2 * offset + 1) over them is L**2.
    return torch.stack([real.sum(), ((2 * offset + 1) * real).sum()])


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer under accelerate's AcceleratedOptimizer (or any wrapper that keeps it as ``.optimizer``)."""
    while not isinstance(optimizer, FusedAdamW) and isinstance(getattr(optimizer, "optimizer", None),
                                                                torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class LamelmCallback(TrainerCallback, ExportableState):
    """Add to a Trainer with ``LamelmCallback().install(trainer)`` (runs before the reporting integrations, so
    TensorBoard/W&B see our numbers) or ``Trainer(callbacks=[LamelmCallback()])``, on every rank under torchrun (a
    logging step sums the ranks' counts: a rank without it would leave the others waiting).

    Each logging row gains ``tokens_per_second`` (real, non-padding tokens over the window's training time: time
    spent evaluating and saving checkpoints is left out), ``mfu`` (with each window's attended length, so padded and
    packed batches count right), GPU utilisation and memory, and health warnings. Tokens and sequence lengths are
    counted on the device by a forward pre-hook on the model and read once per logging step. With a FusedAdamW,
    rows also get its ``skipped_steps`` (non-finite steps it skipped), and its ``grad_norm`` when the Trainer logged
    none (the Trainer did not clip, so the optimizer saw the raw gradients).

    Every HF checkpoint holds the health checks' state (``stateful_callbacks`` in its trainer_state.json): a resumed
    run warns and stops early as the uninterrupted run would, without ``restore_callback_states_from_checkpoint``.
    ``thresholds`` may also be a dict of :class:`HealthThresholds` fields (as that flag restores them).
    """

    def __init__(self, peak_tflops: float | None = None,
                 thresholds: HealthThresholds | Mapping[str, Any] | None = None,
                 early_stopping_patience: int | None = None) -> None:
        self.peak_tflops = peak_tflops
        if isinstance(thresholds, Mapping):
            thresholds = HealthThresholds(**thresholds)
        self.health = HealthMonitor(thresholds, has_eval=True, early_stopping_patience=early_stopping_patience)
        self.gpu: GpuMonitor | None = None
        self._params: tuple[int, int, int] | None = None
        self._model_config: Any = None
        self._peak: float | None = None
        self._hook: Any = None
        self._sums: Tensor | None = None  # [tokens, sum of squared sequence lengths] of the window, on device
        self._training = False
        self._resuming = False  # a resumed run before its first step
        self._window_start = 0.0  # when the logging window began
        self._paused = 0.0  # seconds of the window spent evaluating and saving
        self._last_trained = 0.0  # the last moment known to be training time (after the device finished it)
        self._input_seconds = 0.0  # of the window, from the end of one step's training to the next step's start

    @property
    def warnings(self) -> list[HealthWarning]:
        """Every health warning of the run, those before the checkpoint it resumed from included."""
        return self.health.warnings

    @property
    def health_state(self) -> dict[str, Any]:
        """The health checks' state in JSON types (what checkpoints hold); setting it continues from one."""
        return self.health.json_state_dict()

    @health_state.setter
    def health_state(self, state: Mapping[str, Any]) -> None:
        self.health.load_json_state_dict(state)

    def state(self) -> dict[str, Any]:
        """What the Trainer saves in each checkpoint (on the saving rank only: no collectives here).
        :meth:`on_train_begin` restores ``attributes`` with or without ``restore_callback_states_from_checkpoint``;
        that flag also has the Trainer replace the callback by ``LamelmCallback(**args)`` (the checkpoint's
        settings), added after the others, where without it the resumed run keeps its own settings."""
        return {"args": {"peak_tflops": self.peak_tflops, "thresholds": dataclasses.asdict(self.health.thresholds),
                         "early_stopping_patience": self.health.early_stopping_patience},
                "attributes": {"health_state": self.health_state}}

    def install(self, trainer: Trainer) -> LamelmCallback:
        """Insert after the Trainer's flow callback (whose decisions to evaluate and save it reads) and before the
        reporting integrations."""
        callbacks = trainer.callback_handler.callbacks
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)
        self._measure(trainer.model)
        return self

    def _measure(self, model: nn.Module | None) -> None:
        """Parameter counts and config for MFU, from a model whose parameters are whole: FSDP1 hands callbacks its
        wrapped model at train begin, whose parameters are this rank's shards (the counts from init stand)."""
        if model is None or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return
        config = getattr(model, "config", None)  # (a plain nn.Module has none: no MFU)
        self._params, self._model_config = (count_parameters(model), config) if config is not None else (None, None)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        self._measure(model)

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Evaluation, generation and other forwards without gradients (TRL's reference pass in DPO, GRPO's
        # generation, in train mode) train nothing.
        if not (module.training and torch.is_grad_enabled()):
            return
        inputs = kwargs if "input_ids" in kwargs or "inputs_embeds" in kwargs or not args else {
            **kwargs, "input_ids": args[0]}
        sums = sequence_length_sums(inputs)
        if sums is not None and self._sums is not None:
            self._sums += sums.to(self._sums.device)  # a no-op move: the Trainer puts the batch on args.device

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self.health.has_eval = args.eval_strategy != "no"
        self._resuming = state.global_step > 0  # a fresh run's state starts at step 0
        self._restore(args, state)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if model is not None:
            self._measure(model)  # (a model_init model replaces the one counted at init)
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        on_cuda = torch.cuda.is_available() and not args.use_cpu
        self.gpu = GpuMonitor() if on_cuda else None
        if self.gpu is not None:
            self.gpu.start()
        name = self.gpu.name if self.gpu is not None and self.gpu.available else (
            torch.cuda.get_device_name() if on_cuda else None)
        self._peak = peak_flops(name, self.peak_tflops)
        # On args.device, also on ranks whose hook sees no batch: every rank joins the logging step's all-reduce.
        self._sums = torch.zeros(2, dtype=torch.int64, device=args.device)
        self._training = True
        self._window_start = self._last_trained = time.perf_counter()
        self._paused = self._input_seconds = 0.0

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        """A resumed run's ``state`` is the checkpoint's trainer_state.json, read by every rank (rank 0 wrote it):
        every rank continues the same health checks."""
        name = type(self).__name__  # the Trainer's key for a callback's state
        saved = state.stateful_callbacks.get(name)
        # Another version's entry may be shaped otherwise; several callbacks of one name are saved as a list.
        attributes = saved.get("attributes") if isinstance(saved, Mapping) else None
        health = attributes.get("health_state") if isinstance(attributes, Mapping) else None
        if self._resuming and isinstance(health, Mapping):
            self.health_state = health
        elif self._resuming and args.should_log:  # every rank starts afresh; the main process says so
            logger.warning("lamelm: the checkpoint at step %d holds no %s state (saved without it, by another "
                           "version, or with several of them on one Trainer): its health checks start afresh",
                           state.global_step, name)
        # The Trainer's next save writes into this entry and fails where the checkpoint lacks it.
        state.stateful_callbacks.setdefault(name, self.state())

    def _training_done(self, args: TrainingArguments, control: TrainerControl) -> None:
        """Marks the end of a step's training time, before the Trainer may log, evaluate or save.

        When it will evaluate or save without logging first, the device is synchronised here so that the step's
        queued kernels count as training, not as the pause (a logging step syncs in ``on_log`` anyway)."""
        if (control.should_evaluate or control.should_save) and not control.should_log:
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
        self._last_trained = time.perf_counter()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        if self._resuming:
            # Before a resumed run's first step the Trainer skipped the batches already trained on (reading and
            # dropping them, from an iterable dataset): neither training time nor GPU load.
            self._resuming = False
            self._pause_ends()
            if self.gpu is not None:
                self.gpu.window()
        # Between a step's end (past any evaluation, save or logging) and the next step's begin, the Trainer fetched
        # that step's batches: the window's input time, as our loop measures it (WindowMetrics.preparing_input).
        self._input_seconds += time.perf_counter() - self._last_trained

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._training_done(args, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training_done(args, control)

    def _pause_ends(self) -> None:
        """An evaluation or a save has just finished: its time, since the last training moment, is not training."""
        if self._training:
            now = time.perf_counter()
            self._paused += now - self._last_trained
            self._last_trained = now

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._pause_ends()

    def _report(self, warnings: list[HealthWarning], state: TrainerState, control: TrainerControl) -> None:
        for warning in warnings:
            logger.warning("lamelm health (step %d): %s", warning.step, warning.message)
            if warning.fatal:
                control.should_training_stop = True
        if warnings and state.log_history:
            state.log_history[-1].setdefault("health_warnings", []).extend(
                {"check": w.check, "message": w.message} for w in warnings)  # (explain reads them back)

    def _read_window(self, args: TrainingArguments, optimizer: Any) -> dict[str, float]:
        """One device read per logging step: the window's ``tokens`` and ``squares`` (sum of squared sequence
        lengths) over all ranks, and a FusedAdamW's last ``grad_norm`` and ``skipped_steps``."""
        values: dict[str, Tensor] = {}
        if self._sums is not None:
            sums = self._sums.double()
            if args.world_size > 1 and dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)  # on_log runs on every rank at the same steps
            values["tokens"], values["squares"] = sums.unbind()
            self._sums.zero_()
        if isinstance(optimizer, FusedAdamW):
            if optimizer.grad_norm is not None:
                values["grad_norm"] = optimizer.grad_norm
            values["skipped_steps"] = optimizer.skipped_steps
        if not values:
            return {}
        device = next(iter(values.values())).device
        read = torch.stack([value.detach().to(device, torch.float64) for value in values.values()]).tolist()
        return dict(zip(values, read, strict=True))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        optimizer = _unwrapped(optimizer)
        read = self._read_window(args, optimizer)
        now = time.perf_counter()  # after the read: the device has finished the window's work
        elapsed = max(now - self._window_start - self._paused, 1e-9)
        self._window_start = self._last_trained = now
        self._paused = 0.0
        added: dict[str, Any] = {"input_share": min(self._input_seconds / elapsed, 1.0)}
        self._input_seconds = 0.0
        if read.get("tokens"):  # none when the model was never called through the hooked module
            added["tokens_per_second"] = read["tokens"] / elapsed
            if self._params is not None:
                attended = read["squares"] / read["tokens"]
                per_token = flops_per_token(self._model_config, *self._params, seq_len=attended)
                # The peak is one device's: each device's share of the tokens.
                added["mfu"] = mfu(added["tokens_per_second"] / max(args.world_size, 1), per_token, self._peak)
        if "skipped_steps" in read:
            added["skipped_steps"] = int(read["skipped_steps"])
        if "grad_norm" not in logs and "grad_norm" in read and not args.max_grad_norm > 0:
            added["grad_norm"] = read["grad_norm"]  # unclipped gradients: the norm before clipping, as HF logs
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
        self._pause_ends()  # called once the evaluation has finished
        if metrics and "eval_loss" in metrics:
            self._report(self.health.on_eval_row({"step": state.global_step, "val_loss": metrics["eval_loss"]}),
                         state, control)
            if self.health.should_stop:
                control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.gpu is not None:
            self.gpu.stop()
