"""--eval-samples: at each evaluation the model's greedy completions of validation prompts, logged beside the
references; they are what the model at that step generates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from lamelm_fast.metrics.logger import RunLogger
from lamelm_fast.train import TrainConfig, train
from lamelm_fast.train.config import ConfigError, validate
from lamelm_fast.train.data import Example, prepare_datasets
from lamelm_fast.train.model import load_tokenizer
from lamelm_fast.train.samples import (
    NEW_TOKENS,
    TEXT_PROMPT_TOKENS,
    generate_samples,
    prompt_and_reference,
    stop_token_ids,
)


def test_samples_are_the_models_own_greedy_completions(tmp_path: Path, tiny_model_dir: Path,
                                                       small_alpaca: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = TrainConfig(model=str(tiny_model_dir), dataset=str(small_alpaca), finetune="full", learning_rate=1e-3,
                         max_steps=4, eval_steps=2, eval_samples=2, eval_split_ratio=0.2, per_device_train_batch_size=4,
                         max_seq_length=128, save_steps=2, output_dir=str(tmp_path / "run"), quiet=True, seed=5)
    result = train(config)
    samples = [row for row in result.history if row["type"] == "sample"]
    assert [(row["step"], row["index"]) for row in samples] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    on_disk = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row for row in on_disk if row["type"] == "sample"] == samples

    tokenizer = load_tokenizer(config)
    _, held_out, _ = prepare_datasets(str(small_alpaca), "train", "auto", tokenizer, 128, False, 0.2, 5)
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    for row, example in zip(samples, held_out[:2] * 2, strict=True):
        model = AutoModelForCausalLM.from_pretrained(result.run_dir / f"checkpoint-{row['step']}").eval()
        prompt, reference = prompt_and_reference(example)
        assert row["prompt"] == tokenizer.decode(prompt, skip_special_tokens=True)
        assert row["reference"] == tokenizer.decode(reference, skip_special_tokens=True)
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             generation_config=generation)
        assert row["completion"] == tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    # After 2 steps the model still babbles, so the check above compared real text; 2 steps more changed it.
    assert samples[0]["completion"] and samples[1]["completion"]
    assert samples[0]["completion"] != samples[2]["completion"]


def test_prompt_and_reference_split() -> None:
    chat = Example(list(range(10, 110)), [False] * 30 + [True] * 70)
    assert prompt_and_reference(chat) == (list(range(10, 40)), list(range(40, 40 + NEW_TOKENS)))
    text = Example(list(range(100)), [True] * 100)  # every token a target: continue its first tokens
    assert prompt_and_reference(text) == (list(range(TEXT_PROMPT_TOKENS)),
                                          list(range(TEXT_PROMPT_TOKENS, TEXT_PROMPT_TOKENS + NEW_TOKENS)))
    short = Example([1, 2, 3, 4, 5], [True] * 5)
    assert prompt_and_reference(short) == ([1, 2], [3, 4, 5])


def test_first_sample_printed_and_bad_settings_refused(tmp_path: Path) -> None:
    stream = io.StringIO()
    logger = RunLogger(tmp_path, 10, stream=stream)
    logger.sample_rows(4, [{"index": 0, "prompt": "### Response:\n", "completion": "def f(): pass", "reference": "x"}])
    logger.close()
    assert "sample @ step 4: ...'### Response:\\n' -> 'def f(): pass'" in stream.getvalue()
    with pytest.raises(ConfigError, match="set --eval-split-ratio > 0"):
        validate(TrainConfig(eval_samples=2, eval_split_ratio=0.0))
    with pytest.raises(ConfigError, match="eval_samples must be >= 0"):
        validate(TrainConfig(eval_samples=-1))


def test_a_completion_stops_at_the_models_own_end_token(embedded_tokenizer) -> None:
    """A chat model's end of turn is often in its generation config only, not the tokenizer's eos."""
    model = tiny_model("llama").eval()
    end_of_turn = 42
    with torch.no_grad():  # a model that always says token 42
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_of_turn] = 1.0
        model.model.norm.weight.fill_(1.0)
    example = Example([5, 6, 7, 8, 9, 10], [False, False, False, True, True, True])
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, embedded_tokenizer) == [embedded_tokenizer.eos_token_id]
    babble = generate_samples(model, [example], embedded_tokenizer, None)[0]["completion"]
    model.generation_config.eos_token_id = [end_of_turn, 3]
    assert stop_token_ids(model, embedded_tokenizer) == sorted({3, end_of_turn, embedded_tokenizer.eos_token_id})
    stopped = generate_samples(model, [example], embedded_tokenizer, None)[0]["completion"]
    assert stopped == embedded_tokenizer.decode([end_of_turn], skip_special_tokens=True)
    assert babble == embedded_tokenizer.decode([end_of_turn] * NEW_TOKENS, skip_special_tokens=True)


def test_under_train_on_prompt_samples_still_complete_the_prompt(embedded_tokenizer) -> None:
    from conftest import embedded_records
    from lamelm_fast.train.data import Record, encode_record

    record = Record(embedded_records(1)[0], "x")
    alone = encode_record(record, "alpaca", embedded_tokenizer, train_on_prompt=False)
    everything = encode_record(record, "alpaca", embedded_tokenizer, train_on_prompt=True)
    assert list(everything.input_ids) == list(alone.input_ids) and all(everything.target_mask[1:])
    assert prompt_and_reference(everything) == prompt_and_reference(alone)
    assert len(prompt_and_reference(alone)[0]) > TEXT_PROMPT_TOKENS  # not the text fallback's first tokens
