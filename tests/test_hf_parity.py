"""Our loop against transformers.Trainer: same tiny Llama, data, order and hyperparameters, fp32 on CPU.

60 examples of unequal length at batch 2 x accumulation 4 make 30 micro-batches per epoch: 7 full windows and
one of 2, so the 20 steps cross epoch boundaries and exercise the short last window too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import embedded_records, write_jsonl
from lamelm_fast.train import TrainConfig, train
from lamelm_fast.train.data import prepare_datasets

HYPERPARAMETERS = dict(learning_rate=2e-3, weight_decay=0.01, max_grad_norm=0.5, lr_scheduler_type="cosine",
                       warmup_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=20,
                       logging_steps=1, seed=1)


def hf_trainer_history(model_dir: Path, dataset: Path, tmp_path: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _, _ = prepare_datasets(str(dataset), "train", "auto", tokenizer, 128, False, 0.0, 1)
    rows = [{"input_ids": e.input_ids,
             "labels": [t if m else -100 for t, m in zip(e.input_ids, e.target_mask, strict=True)]}
            for e in examples]
    assert len({len(r["input_ids"]) for r in rows}) > 10  # unequal lengths

    def pad(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.zeros(len(features), width, dtype=torch.long),
                 "labels": torch.full((len(features), width), -100, dtype=torch.long),
                 "attention_mask": torch.zeros(len(features), width, dtype=torch.long)}
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(feature["input_ids"])
            batch["labels"][row, :n] = torch.tensor(feature["labels"])
            batch["attention_mask"][row, :n] = 1
        return batch

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), train_sampling_strategy="sequential", report_to=[],
                             save_strategy="no", use_cpu=True, optim="adamw_torch", disable_tqdm=True,
                             adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, **HYPERPARAMETERS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=pad)
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row and "step" in row]


@pytest.mark.parametrize("packing", [False, True])
def test_per_step_losses_and_learning_rates_match_hf_trainer(tmp_path: Path, tiny_model_dir: Path,
                                                            packing: bool) -> None:
    dataset = write_jsonl(tmp_path / "d.jsonl", embedded_records(60, max_chars=600))
    hf_rows = hf_trainer_history(tiny_model_dir, dataset, tmp_path)
    ours = train(TrainConfig(model=str(tiny_model_dir), dataset=str(dataset), finetune="full", max_seq_length=128,
                             eval_split_ratio=0.0, shuffle=False, packing=packing, output_dir=str(tmp_path / "ours"),
                             quiet=True, **HYPERPARAMETERS))
    our_rows = [row for row in ours.history if row["type"] == "train"]
    assert [r["step"] for r in our_rows] == [r["step"] for r in hf_rows] == list(range(1, 21))
    for mine, theirs in zip(our_rows, hf_rows, strict=True):
        assert abs(mine["loss"] - theirs["loss"]) <= 1e-4 * abs(theirs["loss"]), (mine, theirs)
        assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-12)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)
        assert mine["epoch"] == pytest.approx(theirs["epoch"], rel=1e-9)
    assert our_rows[-1]["loss"] < our_rows[0]["loss"] - 0.5  # it trains, and HF agrees all the way
