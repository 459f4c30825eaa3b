"""Activation checkpointing through the trainer's model loading: ``keep_attention`` runs each layer's attention once
per step instead of twice, ``every_n_layers`` leaves the other layers uncheckpointed, and neither changes a loss or a
gradient (full, LoRA and QLoRA with dropout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import embedded_records, rel_err
from lamelm_fast.train.activation_checkpointing import ATTENTION_OPS
from lamelm_fast.train.config import ConfigError, TrainConfig, resolve, validate
from lamelm_fast.train.data import Record, collate, encode_record
from lamelm_fast.train.faults import out_of_memory_message
from lamelm_fast.train.model import causal_lm_loss, load_model, load_model_config

LAYERS = 2  # tiny_model_dir's


class AttentionRuns(TorchDispatchMode):
    """Counts the fused attention ops that really execute (the checkpoint's own mode answers a kept one itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ATTENTION_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def train_step(tiny_model_dir: Path, tokenizer, finetune: str, policy: str | None, device: str = "cpu",
               every_n_layers: int = 1) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Attention runs, loss and gradients of one packed step of the trainer's model under ``policy`` (None: no
    checkpointing); bf16 autocast on a GPU."""
    config = resolve(TrainConfig(model=str(tiny_model_dir), finetune=finetune, lora_dropout=0.1,
                                 gradient_checkpointing=policy is not None, bf16=device == "cuda",
                                 gradient_checkpointing_policy=policy or "full",
                                 gradient_checkpointing_every_n_layers=every_n_layers))
    validate(config)
    loaded = load_model(config, load_model_config(config), torch.device(device))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero, which would zero every gradient of A
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    examples = [encode_record(Record(r, "x"), "alpaca", tokenizer, False) for r in embedded_records(3)]
    batch = collate(examples, packing=True, pad_token_id=tokenizer.pad_token_id).to(loaded.device)
    loaded.model.train()
    torch.manual_seed(5)  # the same LoRA dropout masks in every run; checkpointing replays them in the recompute
    with AttentionRuns() as runs:
        loss, _ = causal_lm_loss(loaded.model, batch, batch.num_targets, loaded.autocast_dtype)
        loss.backward()
    grads = {n: p.grad for n, p in loaded.model.named_parameters() if p.grad is not None}
    return runs.count, loss.detach(), grads


@pytest.mark.parametrize("finetune", ["full", "lora", "qlora"])
def test_keep_attention_skips_the_attention_recompute_and_changes_no_number(
        finetune: str, tiny_model_dir: Path, embedded_tokenizer, single_thread) -> None:
    plain_runs, plain_loss, plain_grads = train_step(tiny_model_dir, embedded_tokenizer, finetune, None)
    assert plain_runs == LAYERS and plain_grads
    # Every layer or every other one (layer 0 of 2) checkpointed; the attention of a checkpointed layer runs again
    # in backward unless it is kept.
    for policy, every, recomputed in (("full", 1, LAYERS), ("keep_attention", 1, 0), ("full", 2, 1),
                                      ("keep_attention", 2, 0)):
        runs, loss, grads = train_step(tiny_model_dir, embedded_tokenizer, finetune, policy, every_n_layers=every)
        assert runs == LAYERS + recomputed, (policy, every)
        assert torch.equal(loss, plain_loss), policy
        assert grads.keys() == plain_grads.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, plain_grads[name]), (policy, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("finetune", ["full", "qlora"])
def test_keep_attention_on_the_gpu_with_the_triton_kernels(finetune: str, tiny_model_dir: Path,
                                                          embedded_tokenizer) -> None:
    plain_runs, plain_loss, plain_grads = train_step(tiny_model_dir, embedded_tokenizer, finetune, None, "cuda")
    runs, loss, grads = train_step(tiny_model_dir, embedded_tokenizer, finetune, "keep_attention", "cuda")
    assert (plain_runs, runs) == (LAYERS, LAYERS)
    assert torch.equal(loss, plain_loss)  # the forward is the same ops in the same order
    for name, grad in grads.items():  # flash attention's backward accumulates in a nondeterministic order
        assert rel_err(grad, plain_grads[name]) < 1e-2, name


def test_keep_attention_is_refused_where_it_would_do_nothing() -> None:
    with pytest.raises(ConfigError, match="add --gradient-checkpointing"):
        validate(TrainConfig(gradient_checkpointing_policy="keep_attention"))
    with pytest.raises(ConfigError, match="gradient_checkpointing_every_n_layers applies"):
        validate(TrainConfig(gradient_checkpointing_every_n_layers=2))
    with pytest.raises(ConfigError, match="gradient_checkpointing_every_n_layers must be >= 1"):
        validate(TrainConfig(gradient_checkpointing=True, gradient_checkpointing_every_n_layers=0))
    with pytest.raises(ConfigError, match="--attn-implementation sdpa"):
        validate(TrainConfig(gradient_checkpointing=True, gradient_checkpointing_policy="keep_attention",
                             attn_implementation="eager"))


def test_out_of_memory_advice_names_the_settings_that_save_more() -> None:
    kept = TrainConfig(gradient_checkpointing=True, gradient_checkpointing_policy="keep_attention",
                       max_seq_length=2048)
    assert "--gradient-checkpointing-policy full" in out_of_memory_message(3, kept, 70.0, 80.0, None, "x")
    partial = TrainConfig(gradient_checkpointing=True, gradient_checkpointing_every_n_layers=3)
    assert "--gradient-checkpointing-every-n-layers 1" in out_of_memory_message(3, partial, 70.0, 80.0, None, "x")
    full = TrainConfig(gradient_checkpointing=True, max_seq_length=2048, finetune="full", bf16=True)
    advice = out_of_memory_message(3, full, 70.0, 80.0, None, "x")
    assert "--gradient-checkpointing" not in advice and "--bf16-weights" in advice
