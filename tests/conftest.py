"""Shared fixtures: a tiny Llama saved as a local HF model directory, and small real datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be set before triton is
# imported; the ops still pick the torch reference on CPU unless a test asks for the Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama_config(vocab_size: int, **overrides: object):
    from transformers import LlamaConfig

    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each 4-bit matmul strategy's launch function (fused Triton GEMM, dequantize + cuBLAS)."""
    from lamelm_fast.kernels import nf4_lora

    counts = {"fused": 0, "dequant": 0}

    def counting(name: str, launch):
        def counted(*args, **kwargs):
            counts[name] += 1
            return launch(*args, **kwargs)
        return counted

    for name, attr in (("fused", "matmul_4bit_lora"), ("dequant", "dequant_matmul_4bit_lora")):
        monkeypatch.setattr(nf4_lora, attr, counting(name, getattr(nf4_lora, attr)))
    return counts


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from lamelm_fast.train.config import TrainConfig
    from lamelm_fast.train.model import load_tokenizer

    return load_tokenizer(TrainConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer) -> Path:
    """A randomly initialised 2-layer Llama with the embedded tokenizer, saved with save_pretrained."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(embedded_tokenizer))).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


def embedded_records(count: int, max_chars: int = 400) -> list[dict]:
    """The first ``count`` short records of the shipped stdlib instruction set (real text)."""
    from lamelm_fast.train.data import embedded_dataset_path

    records = []
    with embedded_dataset_path().open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if len(record["instruction"]) + len(record["output"]) <= max_chars:
                records.append(record)
                if len(records) == count:
                    break
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def small_alpaca(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", embedded_records(48))
