"""The dataset and tokenizer shipped in lamelm_fast/assets are what `python -m lamelm_fast.train` uses."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import lamelm_fast.assets

ASSETS = Path(lamelm_fast.assets.__file__).parent
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    lines = (ASSETS / "data" / "python_stdlib_functions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer", local_files_only=True)


def test_dataset_records(records: list[dict[str, str]]) -> None:
    assert len(records) >= 2000
    for record in records:
        assert set(record) == {"instruction", "input", "output"}
        assert record["instruction"].strip()
        assert record["output"].startswith(("def ", "async def "))


def test_tokenizer_round_trips_dataset_text(
    tokenizer: PreTrainedTokenizerBase, records: list[dict[str, str]]
) -> None:
    for record in records[:: len(records) // 20]:
        text = record["instruction"] + "\n" + record["output"]
        ids = tokenizer(text)["input_ids"]
        assert EOS not in tokenizer.convert_ids_to_tokens(ids)  # no BOS/EOS added implicitly
        assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.pad_token == EOS
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 1024


def test_chat_template_is_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
