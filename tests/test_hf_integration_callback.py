"""LamelmCallback in a transformers.Trainer run: training time without evaluation and saving, attended length of
padded and packed batches, tokens counted without HF's per-micro-batch host read, health checks continued across a
resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers.trainer
from transformers import DataCollatorWithFlattening, Trainer, TrainerControl, TrainerState, TrainingArguments

from conftest import tiny_model
from lamelm_fast.explain import analyse, load_run
from lamelm_fast.integrations.hf import LamelmCallback, sequence_length_sums
from lamelm_fast.metrics.health import HealthThresholds
from lamelm_fast.metrics.throughput import count_parameters, flops_per_token, mfu

LENGTHS = [3, 11, 7, 16, 5, 9, 14, 2, 12, 6, 8, 15]


def examples(lengths: list[int] = LENGTHS) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 97, (length,), generator=generator).tolist() for length in lengths]
    return [{"input_ids": ids, "labels": ids} for ids in rows]


def pad(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right padding with an attention mask, as DataCollatorForLanguageModeling gives."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        ids[row, :len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        mask[row, :len(feature["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_sequence_length_sums_of_padded_packed_and_varlen_batches() -> None:
    features = examples([3, 5, 2])
    expected = [10, 9 + 25 + 4]
    assert sequence_length_sums(pad(features)).tolist() == expected
    left = pad(features)
    left["attention_mask"] = left["attention_mask"].flip(-1)  # left padding: the real tokens are at the end
    assert sequence_length_sums(left).tolist() == expected
    packed = DataCollatorWithFlattening()(features)  # [1, 10], position_ids restart at each sequence
    assert packed["input_ids"].shape == (1, 10) and "attention_mask" not in packed
    assert sequence_length_sums(packed).tolist() == expected
    offset = DataCollatorWithFlattening(position_ids_start=2)(features)
    assert sequence_length_sums(offset).tolist() == expected
    varlen = DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True)(features)
    assert "position_ids" not in varlen and sequence_length_sums(varlen).tolist() == expected
    by_index = DataCollatorWithFlattening(return_position_ids=False, return_seq_idx=True)(features)
    assert sequence_length_sums(by_index).tolist() == expected
    assert sequence_length_sums({"input_ids": torch.zeros(2, 6, dtype=torch.long)}).tolist() == [12, 72]
    assert sequence_length_sums({"inputs_embeds": torch.zeros(2, 6, 8)}).tolist() == [12, 72]
    assert sequence_length_sums({"labels": torch.zeros(2, 6)}) is None


class Recorded:
    """A collator that notes each training batch's real sequence lengths."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.batches: list[list[int]] = []

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        self.batches.append([len(f["input_ids"]) for f in features])
        return self.collate(features)


def args_for(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=3, max_steps=4,
                                  logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no",
                                  use_cpu=True, disable_tqdm=True, seed=0, remove_unused_columns=False)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.mark.parametrize("collate", [pad, DataCollatorWithFlattening()], ids=["padded", "packed"])
def test_mfu_uses_each_window_attended_length(tmp_path: Path, collate: Any) -> None:
    model = tiny_model("llama")
    recorded = Recorded(collate)
    args = args_for(tmp_path, gradient_accumulation_steps=2, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=recorded,
                      callbacks=[LamelmCallback(peak_tflops=1.0)])
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 2 and len(recorded.batches) == 4  # each window: two micro-batches of 3 sequences
    for row, window in zip(rows, (recorded.batches[:2], recorded.batches[2:]), strict=True):
        lengths = [length for batch in window for length in batch]
        attended = sum(n * n for n in lengths) / sum(lengths)
        expected = mfu(row["tokens_per_second"], flops_per_token(model.config, *count_parameters(model), attended),
                       1e12)
        assert row["mfu"] == pytest.approx(expected, rel=1e-9)
    # Tokens are counted on the device by the callback: HF's own count (a host read per micro-batch) stays off.
    assert args.include_num_input_tokens_seen in ("no", False)


class Clock:
    """The callback's clock, advanced by hand: a training forward takes 1 s, an evaluation or a save 100 s, so the
    windows' times are exact whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class SlowEvaluationAndSaving(Trainer):
    clock: Clock

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self.clock.now += 100.0
        return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.clock.now += 100.0
        super()._save_checkpoint(*args, **kwargs)


def test_tokens_per_second_leaves_out_evaluation_and_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lamelm_fast.integrations import hf

    clock = Clock()
    monkeypatch.setattr(hf, "time", clock)
    model = tiny_model("llama")
    model.register_forward_pre_hook(lambda module, args: setattr(clock, "now", clock.now + module.training))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 97, (24, 17)).tolist()]
    # Windows (0, 2], (2, 4], (4, 6]: an evaluation at step 3 (not a logging step), a save at step 5.
    args = args_for(tmp_path, per_device_train_batch_size=2, max_steps=6, logging_steps=2, eval_strategy="steps",
                    eval_steps=3, save_strategy="steps", save_steps=5)
    trainer = SlowEvaluationAndSaving(model=model, args=args, train_dataset=data, eval_dataset=data[:2],
                                      callbacks=[LamelmCallback()])
    trainer.clock = clock
    trainer.train()
    assert clock.now > 200  # the evaluations and the save did run
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4, 6]
    for row in rows:  # each window: 2 steps of one 1 s forward, 2 sequences of 17 tokens each
        assert row["tokens_per_second"] == pytest.approx(2 * 2 * 17 / 2.0), row["step"]


def test_input_share_is_the_time_between_steps_spent_fetching_batches(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer fetches a step's batches between one step's end and the next one's begin: with a 3 s collator
    and a 1 s forward, three quarters of a window. (accelerate's loader reads one batch ahead: the first window also
    holds that batch's 3 s.)"""
    from lamelm_fast.integrations import hf

    clock = Clock()
    monkeypatch.setattr(hf, "time", clock)
    model = tiny_model("llama")
    model.register_forward_pre_hook(lambda module, args: setattr(clock, "now", clock.now + module.training))

    def slow_pad(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        clock.now += 3.0
        return pad(features)

    args = args_for(tmp_path, per_device_train_batch_size=2, max_steps=4, logging_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=slow_pad,
                      callbacks=[LamelmCallback()])
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4]
    assert rows[0]["input_share"] >= 0.75 and rows[1]["input_share"] == pytest.approx(0.75)


def flat_run(tmp_path: Path, name: str, clock: Clock, resume_from: Path | None = None,
             **overrides: Any) -> Trainer:
    """7 steps over one repeated example at a tiny learning rate: the loss is flat from the start, and the health
    check (over 3 windows here) says so at step 3 and only then. A checkpoint every 2 steps; on the callback's clock
    a training forward takes 1 s, a save 100 s, and a resumed run's skipping of the batches already trained 100 s
    a batch (as reading them from an iterable dataset may)."""
    model = tiny_model("llama")
    model.register_forward_pre_hook(lambda module, args: setattr(clock, "now", clock.now + module.training))
    ids = list(range(1, 18))
    args = args_for(tmp_path / name, per_device_train_batch_size=2, max_steps=7, learning_rate=1e-6,
                    lr_scheduler_type="constant", save_strategy="steps", save_steps=2, **overrides)
    trainer = SlowEvaluationAndSaving(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 14,
                                      callbacks=[LamelmCallback(peak_tflops=1.0,
                                                                thresholds=HealthThresholds(flat_windows=3))])
    trainer.clock = clock
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def lamelm_of(trainer: Trainer) -> LamelmCallback:
    """The callback the Trainer runs (restore_callback_states_from_checkpoint replaces the one it was given)."""
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LamelmCallback))


@pytest.mark.parametrize("restore_flag", [False, True], ids=["default", "restore_callback_states"])
def test_a_resumed_run_logs_and_warns_as_the_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_flag: bool) -> None:
    from lamelm_fast.integrations import hf

    clock = Clock()
    monkeypatch.setattr(hf, "time", clock)
    skip = transformers.trainer.skip_first_batches

    def slow_skip(dataloader: Any, num_batches: int) -> Any:
        clock.now += 100.0 * num_batches
        return skip(dataloader, num_batches)

    monkeypatch.setattr(transformers.trainer, "skip_first_batches", slow_skip)
    whole = flat_run(tmp_path, "whole", clock)
    warned = [(w.check, w.step, w.message) for w in lamelm_of(whole).warnings]
    assert [(check, step) for check, step, _ in warned] == [("not_learning", 3)]
    # The warning is in trainer_state.json's log history, where `python -m lamelm_fast.explain` reads it back.
    explained = analyse(load_run(Path(whole.args.output_dir) / "checkpoint-4"))["warnings"]
    assert [(w["check"], w["step"], w["message"]) for w in explained] == warned
    rows = [row for row in whole.state.log_history if "loss" in row]
    keys = ("step", "tokens_per_second", "mfu", "health_warnings")
    # From checkpoint-2 the warning at step 3 needs the windows of steps 1 and 2; from checkpoint-4 it was given
    # already (a fresh start would give it again at step 7).
    for step in (2, 4):
        resumed = flat_run(tmp_path, f"from-{step}", clock, Path(whole.args.output_dir) / f"checkpoint-{step}",
                           restore_callback_states_from_checkpoint=restore_flag)
        assert [(w.check, w.step, w.message) for w in lamelm_of(resumed).warnings] == warned
        after = [row for row in resumed.state.log_history if "loss" in row and row["step"] > step]
        assert [[row.get(key) for key in keys] for row in after] == [[row.get(key) for key in keys]
                                                                      for row in rows[step:]]
        assert [row["loss"] for row in after] == pytest.approx([row["loss"] for row in rows[step:]], rel=1e-6)


AFRESH = ("lamelm: the checkpoint at step 2 holds no LamelmCallback state (saved without it, by another version, or "
          "with several of them on one Trainer): its health checks start afresh")


@pytest.mark.parametrize("saved", [None, {"args": {"peak_tflops": None}}, {"attributes": {}}],
                         ids=["no entry", "an entry without attributes", "attributes without health_state"])
def test_a_checkpoint_without_the_callback_state_resumes_afresh(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, saved: dict[str, Any] | None) -> None:
    """Saved without the callback, or by another version whose entry is shaped otherwise: its checks start afresh,
    said once, and the next save (which the Trainer writes into the callback's entry) still works."""
    args = args_for(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=tiny_model("llama"), args=args, train_dataset=examples(), data_collator=pad).train()
    if saved is not None:
        state_file = tmp_path / "hf" / "checkpoint-2" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["stateful_callbacks"]["LamelmCallback"] = saved
        state_file.write_text(json.dumps(state))
    args = args_for(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=examples(), data_collator=pad,
                      callbacks=[LamelmCallback()])
    with caplog.at_level(logging.WARNING, logger="lamelm_fast"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))
    assert [record.getMessage() for record in caplog.records if "start afresh" in record.getMessage()] == [AFRESH]
    saved_state = json.loads((tmp_path / "hf" / "checkpoint-4" / "trainer_state.json").read_text())
    health = saved_state["stateful_callbacks"]["LamelmCallback"]["attributes"]["health_state"]
    assert len(health["_windows"]) == 2  # the losses of steps 3 and 4: this run's, from scratch


class ReplicaArguments(TrainingArguments):
    """The arguments as a process other than the main one sees them (under torchrun)."""

    @property
    def should_log(self) -> bool:
        return False


@pytest.mark.parametrize("main_process", [True, False], ids=["main process", "another rank"])
def test_starting_afresh_is_said_by_the_main_process_only(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           main_process: bool) -> None:
    values = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    args = TrainingArguments(**values) if main_process else ReplicaArguments(**values)
    state = TrainerState(global_step=2, stateful_callbacks={"LamelmCallback": {"args": {}}})
    callback = LamelmCallback()
    with caplog.at_level(logging.WARNING, logger="lamelm_fast"):
        callback.on_train_begin(args, state, TrainerControl())
    callback.on_train_end(args, state, TrainerControl())
    assert [record.getMessage() for record in caplog.records] == ([AFRESH] if main_process else [])
    assert callback.health.warnings == [] and callback.health_state == LamelmCallback().health_state


def test_only_forwards_with_gradients_count_and_sharded_counts_are_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward in train mode without gradients (TRL's reference pass, GRPO's generation) trains nothing; a model
    whose parameters FSDP1 sharded keeps the counts taken at init; a plain nn.Module (no config) gets no MFU."""
    from lamelm_fast.integrations import hf

    model = tiny_model("llama")
    callback = LamelmCallback(peak_tflops=1.0)
    trainer = Trainer(model=model, args=args_for(tmp_path, max_steps=1), train_dataset=examples()[:3],
                      data_collator=pad, callbacks=[callback])
    whole = count_parameters(model)
    assert callback._params == whole  # taken at init
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    batch = pad(examples()[:2])
    model.train()
    with torch.no_grad():
        model(**batch)
    assert callback._sums.tolist() == [0, 0]
    model(**batch)
    assert callback._sums.tolist()[0] == sum(len(f["input_ids"]) for f in examples()[:2])
    callback.on_train_end(trainer.args, trainer.state, trainer.control)

    class Shard(torch.nn.Module):  # stands in for FSDP1's wrapper, whose parameters are this rank's shards
        pass

    monkeypatch.setattr(hf, "FullyShardedDataParallel", Shard)
    wrapped = torch.nn.Sequential(Shard(), torch.nn.Linear(3, 3))
    wrapped.config = model.config
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=wrapped)
    assert callback._params == whole
    callback.on_train_end(trainer.args, trainer.state, trainer.control)
    plain = torch.nn.Linear(3, 3)
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=plain)
    assert callback._params is None
    callback.on_train_end(trainer.args, trainer.state, trainer.control)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_counting_on_cuda_reads_nothing_back() -> None:
    features = examples([3, 5, 2])
    left = pad(features)
    left["attention_mask"] = left["attention_mask"].flip(-1)
    batches = [pad(features), left, DataCollatorWithFlattening()(features),
               DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True)(features)]
    batches = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    callback = LamelmCallback()
    callback._sums = torch.zeros(2, dtype=torch.int64, device="cuda")
    module = torch.nn.Linear(1, 1).train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            callback._count(module, (), batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert callback._sums.tolist() == [4 * 10, 4 * 38]
