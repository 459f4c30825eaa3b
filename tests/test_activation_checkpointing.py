"""Activation checkpointing through the trainer's model loading: ``keep_attention`` runs each layer's attention once
per step instead of twice, ``every_n_layers`` leaves the other layers uncheckpointed, and neither changes a loss or a
gradient (full, LoRA and QLoRA with dropout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from conftest import embedded_records, rel_err
from lamelm_fast.train import activation_checkpointing
from lamelm_fast.train.activation_checkpointing import ATTENTION_OPS, checkpoint_kwargs
from lamelm_fast.train.config import ConfigError, TrainConfig, resolve, validate
from lamelm_fast.train.data import Record, collate, encode_record
from lamelm_fast.train.faults import out_of_memory_message
from lamelm_fast.train.model import causal_lm_loss, load_model, load_model_config

LAYERS = 2  # tiny_model_dir's


class AttentionRuns(TorchDispatchMode):
    """Counts the fused attention ops that really execute (the checkpoint's own mode answers a kept one itself), and
    all ops."""

    def __init__(self) -> None:
        super().__init__()
        self.count = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func._schema.name in ATTENTION_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def train_step(tiny_model_dir: Path, tokenizer, finetune: str, policy: str | None, device: str = "cpu",
               every_n_layers: int = 1, runs: AttentionRuns | None = None,
               ) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Attention runs (counted by ``runs``, or a new one), loss and gradients of one packed step of the trainer's
    model under ``policy`` (None: no checkpointing); bf16 autocast on a GPU."""
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
    with runs or AttentionRuns() as runs:
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


def test_keep_attention_passes_only_the_attention_calls_through_its_python_mode(
        tiny_model_dir: Path, embedded_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode that keeps and hands back attention outputs runs Python for every op it sees: it must see the
    attention calls' few ops, not every op of the checkpointed layers (on an H100 that made the step 1.75x slower)."""
    seen = []
    dispatch = activation_checkpointing._KeptAttention.__torch_dispatch__

    def counted(self, func, types, args=(), kwargs=None):
        seen.append((self.recompute, func._schema.name))
        return dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(activation_checkpointing._KeptAttention, "__torch_dispatch__", counted)
    runs = AttentionRuns()
    attention_runs, _, _ = train_step(tiny_model_dir, embedded_tokenizer, "qlora", "keep_attention", runs=runs)
    assert attention_runs == LAYERS
    for recompute in (False, True):  # each layer's attention op, forward and recompute
        assert sum(name in ATTENTION_OPS for again, name in seen if again == recompute) == LAYERS
    # Besides them only what the attention functions do around the op (CPU: build the packed rows' mask, repeat the
    # kv heads), a small part of the step.
    assert len(seen) < runs.ops / 10, (len(seen), runs.ops)


class _Module:  # what transformers' sdpa function reads of an attention module
    is_causal, num_key_value_groups, layer_idx, training = True, 1, 0, True


def test_keep_attention_replays_several_attention_calls_in_order_and_backward_twice(single_thread) -> None:
    """Two attention calls in one checkpointed region (the second reads the first's output): the recompute hands
    each its own output without running either, the gradients are the uncheckpointed ones, and a second backward
    (retain_graph) recomputes from the first kept output again."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=generator, requires_grad=True) for _ in range(3))

    def region(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        first, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](_Module(), q, k, v, None)
        second, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](_Module(), first.transpose(1, 2) * 0.5, k, v, None)
        return second.square().sum()

    expected = torch.autograd.grad(region(q, k, v), (q, k, v))
    with AttentionRuns() as runs:
        loss = checkpoint(region, q, k, v, **checkpoint_kwargs("keep_attention"))
        once = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        twice = torch.autograd.grad(loss, (q, k, v))
    assert runs.count == 2  # the forward's two; neither recompute ran one
    for got in (once, twice):
        for grad, want in zip(got, expected, strict=True):
            assert rel_err(grad, want) < 1e-6


def test_keep_attention_refuses_an_attention_output_changed_in_place() -> None:
    """An attention output modified in place after the forward kept it would give backward wrong values: an error
    that names the fix, not a silently wrong gradient."""
    def attention_then_in_place(module, query, key, value, attention_mask, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        return out.mul_(2.0).transpose(1, 2), None

    ALL_ATTENTION_FUNCTIONS["lamelm-test-in-place"] = attention_then_in_place
    try:
        q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))

        def region(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return ALL_ATTENTION_FUNCTIONS["lamelm-test-in-place"](_Module(), q, k, v, None)[0].sum()

        loss = checkpoint(region, q, k, v, **checkpoint_kwargs("keep_attention"))
        with pytest.raises(RuntimeError, match="modified in place.*--gradient-checkpointing-policy full"):
            loss.backward()
    finally:
        del ALL_ATTENTION_FUNCTIONS["lamelm-test-in-place"]


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
