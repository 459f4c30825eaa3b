"""Shared fixtures: a tiny Llama saved as a local HF model directory, and small real datasets."""

from __future__ import annotations

import json
import os
from datetime import datetime, tzinfo
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


def tiny_model(family: str) -> torch.nn.Module:
    """A seeded 2-layer model of ``family`` (llama, qwen3, gemma3) with grouped-query attention and 97 tokens."""
    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(tiny_llama_config(97))
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=512, tie_word_embeddings=False,
                  use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(**common))
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**common, query_pre_attn_scalar=24, sliding_window=8))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors: on a busy CPU the thread barriers cost ~1000x the math."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in float64: ||actual - expected|| / ||expected||."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def model_loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A causal LM's loss on ``ids`` (as labels too) and every parameter gradient it produced."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(result: tuple[torch.Tensor, dict[str, torch.Tensor]],
                         reference: tuple[torch.Tensor, dict[str, torch.Tensor]], *, exact: bool,
                         loss_rtol: float = 1e-6, grad_rtol: float = 1e-5) -> None:
    """Two :func:`model_loss_and_grads` results agree: bit for bit when ``exact`` (the same ops ran), else within the
    relative errors given (a fused kernel rounds differently)."""
    (loss, grads), (want_loss, want_grads) = result, reference
    assert grads.keys() == want_grads.keys() and grads
    if exact:
        assert torch.equal(loss, want_loss)
        for name in grads:
            assert torch.equal(grads[name], want_grads[name]), name
    else:
        assert rel_err(loss, want_loss) < loss_rtol
        for name in grads:
            assert rel_err(grads[name], want_grads[name]) < grad_rtol, name


def lora_with_random_b(model: torch.nn.Module, target_modules: list[str], r: int = 4):
    """``model`` under a PEFT LoRA adapter whose B matrices are random (PEFT starts them at zero, which would zero
    every gradient of A and hide a wrong one)."""
    import peft

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return wrapped


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, functions: dict[str, str]) -> dict[str, int]:
    """Wraps ``module``'s functions (label -> attribute name) to count their calls; returns the live counts."""
    counts = dict.fromkeys(functions, 0)

    def counting(label: str, function):
        def counted(*args, **kwargs):
            counts[label] += 1
            return function(*args, **kwargs)
        return counted

    for label, attr in functions.items():
        monkeypatch.setattr(module, attr, counting(label, getattr(module, attr)))
    return counts


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each 4-bit matmul strategy's launch function (fused Triton GEMM, dequantize + cuBLAS)."""
    from lamelm_fast.kernels import nf4_lora

    return count_calls(monkeypatch, nf4_lora, {"fused": "matmul_4bit_lora", "dequant": "dequant_matmul_4bit_lora"})


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


def chat_records(count: int) -> list[dict]:
    """``count`` one-question conversations (chat format) from :func:`embedded_records`."""
    return [{"messages": [{"role": "user", "content": record["instruction"]},
                          {"role": "assistant", "content": record["output"]}]} for record in embedded_records(count)]


def set_clock(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> None:
    """The clock a chat template's strftime_now reads in transformers set to ``moment`` (what day the run is on)."""
    from transformers.utils import chat_template_utils

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:
            return moment

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)


def as_saved_by_an_older_version(checkpoint: Path, *entries: str) -> None:
    """Remove training-state entries that an older version did not save, and re-list the files as a save does."""
    from lamelm_fast.train import checkpoint as checkpoint_module

    state = torch.load(checkpoint / checkpoint_module.STATE_FILE, weights_only=False)
    for entry in entries:
        del state[entry]
    torch.save(state, checkpoint / checkpoint_module.STATE_FILE)
    (checkpoint / checkpoint_module.MANIFEST_FILE).unlink()  # re-listed without itself, as a save writes it
    checkpoint_module._write_manifest(checkpoint)
