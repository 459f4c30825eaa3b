"""FusedAdamW as a transformers.Trainer's optimizer: HF's groups and hyperparameters, the same training as HF's own
AdamW with clipping, the LR schedule, grad_norm in the logs, and resume from a Trainer checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_model
from lamelm_fast.integrations.hf import LamelmCallback, fused_adamw, fused_adamw_cls_and_kwargs
from lamelm_fast.optim import FusedAdamW


def data() -> list[dict[str, list[int]]]:
    rows = torch.randint(1, 97, (24, 13), generator=torch.Generator().manual_seed(0)).tolist()
    return [{"input_ids": ids, "labels": ids} for ids in rows]


def args_for(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    # A high learning rate so that clipping at 1.0 is active from the start; weight decay and a cosine schedule with
    # warmup so that groups and the scheduler matter.
    values: dict[str, Any] = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=6,
                                  logging_steps=1, learning_rate=3e-2, weight_decay=0.1, adam_beta1=0.8,
                                  adam_beta2=0.99, adam_epsilon=1e-7, max_grad_norm=1.0, lr_scheduler_type="cosine",
                                  warmup_steps=2, optim="adamw_torch", report_to=[], save_strategy="no",
                                  use_cpu=True, disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def rows_of(trainer: Trainer) -> list[tuple[float, float | None, float]]:
    return [(row["loss"], row.get("grad_norm"), row["learning_rate"])
            for row in trainer.state.log_history if "loss" in row]


def run(args: TrainingArguments, resume: str | None = None, trainer_class: type[Trainer] = Trainer,
        **trainer_kwargs: Any) -> Trainer:
    trainer = trainer_class(model=trainer_kwargs.pop("model", None) or tiny_model("llama"), args=args,
                            train_dataset=data(), **trainer_kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_same_rows(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for (loss, norm, lr), (loss_ref, norm_ref, lr_ref) in zip(actual, expected, strict=True):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-4)
        assert lr == pytest.approx(lr_ref, rel=1e-12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[float, float | None, float]]:
    """HF's own AdamW (torch.optim.AdamW, HF's groups) with HF's clipping at 1.0."""
    trainer = run(args_for(tmp_path_factory.mktemp("reference")))
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    rows = rows_of(trainer)
    assert max(norm for _, norm, _ in rows) > 2.0  # clipping was active
    return rows


def test_groups_and_hyperparameters_are_the_trainers(tmp_path: Path) -> None:
    args = args_for(tmp_path)
    hf = Trainer(model=tiny_model("llama"), args=args)
    hf.create_optimizer()
    model = tiny_model("llama")
    ours = fused_adamw(model, args)
    via_trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=fused_adamw_cls_and_kwargs(args))
    via_trainer.create_optimizer()
    names = {id(param): name for name, param in model.named_parameters()}
    hf_names = {id(param): name for name, param in hf.model.named_parameters()}
    expected = [({hf_names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in hf.optimizer.param_groups]
    assert any("norm" in name for name in expected[1][0]) and expected[1][1] == 0.0  # norms: no weight decay
    for optimizer in (ours, via_trainer.optimizer):
        assert isinstance(optimizer, FusedAdamW)
        assert [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups] == expected
        for g in optimizer.param_groups:
            assert (g["lr"], g["betas"], g["eps"], g["max_grad_norm"]) == (3e-2, (0.8, 0.99), 1e-7, None)


def test_clipping_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clipped twice"):
        fused_adamw_cls_and_kwargs(args_for(tmp_path), max_grad_norm=1.0)
    _, kwargs = fused_adamw_cls_and_kwargs(args_for(tmp_path, max_grad_norm=0.0), max_grad_norm=1.0)
    assert kwargs["max_grad_norm"] == 1.0


def test_cls_and_kwargs_trains_as_hf_adamw(tmp_path: Path, reference: list) -> None:
    args = args_for(tmp_path)
    trainer = run(args, optimizer_cls_and_kwargs=fused_adamw_cls_and_kwargs(args), callbacks=[LamelmCallback()])
    assert isinstance(trainer.optimizer.optimizer, FusedAdamW)
    assert_same_rows(rows_of(trainer), reference)  # HF clips and logs its norm; the cosine schedule drives our LR
    assert all(row["skipped_steps"] == 0 for row in trainer.state.log_history if "loss" in row)


def test_ready_made_optimizer_trains_as_hf_adamw(tmp_path: Path, reference: list) -> None:
    args = args_for(tmp_path)
    model = tiny_model("llama")
    trainer = run(args, model=model, optimizers=(fused_adamw(model, args), None))
    assert_same_rows(rows_of(trainer), reference)


class NoHFNorm(Trainer):
    """A Trainer that logs no grad norm of its own when it does not clip (as transformers < 5 did)."""

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return grad_norm


def test_optimizer_clipping_and_callback_grad_norm(tmp_path: Path, reference: list) -> None:
    # The other recipe: the Trainer does not clip, FusedAdamW clips on device; the callback logs the optimizer's
    # norm (before clipping) when the Trainer logs none.
    args = args_for(tmp_path, max_grad_norm=0.0)
    model = tiny_model("llama")
    trainer = run(args, trainer_class=NoHFNorm, model=model, optimizers=(fused_adamw(model, args, max_grad_norm=1.0),
                                                                           None), callbacks=[LamelmCallback()])
    assert_same_rows(rows_of(trainer), reference)


def test_resume_from_a_trainer_checkpoint(tmp_path: Path) -> None:
    args = args_for(tmp_path, save_strategy="steps", save_steps=3)
    whole = rows_of(run(args, optimizer_cls_and_kwargs=fused_adamw_cls_and_kwargs(args)))
    checkpoint = Path(args.output_dir) / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    resumed = run(args, resume=str(checkpoint), optimizer_cls_and_kwargs=fused_adamw_cls_and_kwargs(args))
    state = resumed.optimizer.optimizer.state
    assert all(float(s["step"]) == 6 for s in state.values())  # 3 steps saved + 3 trained
    assert_same_rows(rows_of(resumed)[-3:], whole[-3:])
