"""Packed batches through varlen attention: the same loss and gradients as sdpa over transformers' block-diagonal
mask (Llama, Qwen3, Gemma3; grouped-query attention), sdpa untouched where varlen cannot run.

torch's varlen flash kernel runs on CUDA only, so on CPU a reference of its contract (each sequence's own causal
attention, one sdpa call per sequence) stands in for it: the tests prove the wrapper's layout, the padding-free
arguments our batches carry and the fallback; the GPU test runs torch's kernel itself."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import embedded_records, rel_err, tiny_model
from lamelm_fast.ops import varlen_attention
from lamelm_fast.ops.varlen_attention import mark_padding_free_forwards, patch_varlen_attention
from lamelm_fast.train.data import Batch, Example, collate

LAYERS = 2  # tiny_model's


def reference_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                     cu_seq_lens_k: torch.Tensor, max_length_q: int, max_length_k: int, scale: float | None,
                     ) -> torch.Tensor:
    """flash_varlen_attention's contract in plain torch: [tokens, heads, head_dim], each sequence on its own."""
    starts = cu_seq_lens_q.tolist()
    assert starts == cu_seq_lens_k.tolist() and max_length_q == max_length_k == max(
        b - a for a, b in zip(starts, starts[1:], strict=False))
    pieces = []
    for begin, end in zip(starts, starts[1:], strict=False):
        q, k, v = (t[begin:end].transpose(0, 1)[None] for t in (query, key, value))
        pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                     enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(pieces)


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str, key: str,
                run: Callable[..., Any] | None = None) -> dict[str, int]:
    """Replaces ``varlen_attention.<name>`` by a counting wrapper of ``run`` (default: itself); the count is
    ``calls[key]``."""
    calls = {key: 0}
    run = run or getattr(varlen_attention, name)

    def counted(*args, **kwargs):
        calls[key] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(varlen_attention, name, counted)
    return calls


@pytest.fixture
def varlen_on_cpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The wrapper's varlen path on CPU tensors, through ``reference_varlen``; counts its calls."""
    monkeypatch.setattr(varlen_attention, "flash_runs", lambda device, dtype: True)
    return count_calls(monkeypatch, "flash_varlen_attention", "varlen", reference_varlen)


def packed_batch(lengths: list[int], seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    examples = [Example(torch.randint(1, 97, (n,), generator=generator).tolist(), [False] + [True] * (n - 1))
                for n in lengths]
    return collate(examples, packing=True, pad_token_id=0)


def loss_and_grads(model: torch.nn.Module, batch: Batch, padding_free: bool,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   **(batch.attention_kwargs() if padding_free else {})).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def padded_counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The wrapper's CPU path (``padded_causal_attention``) as it is; counts its calls."""
    return count_calls(monkeypatch, "padded_causal_attention", "padded")


def marked(model: torch.nn.Module) -> torch.nn.Module:
    """The model as apply_kernels leaves its attention: its sdpa calls may take the padding-free paths."""
    mark_padding_free_forwards(model.model)
    return model


def test_a_model_apply_kernels_never_saw_keeps_transformers_attention(padded_counted: dict[str, int]) -> None:
    """The sdpa wrapper is process-wide; its padding-free paths are for marked models only. Llama 4's chunked
    attention lives in its mask alone: run padding-free it attended across chunks (logits off by ~0.5) once any
    model in the process had been patched. Unmarked, it is transformers' own, bit for bit."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from lamelm_fast import apply_kernels

    apply_kernels(tiny_model("llama"), cross_entropy=False, lora=False)  # another model of the process
    torch.manual_seed(0)
    chunked = Llama4ForCausalLM(Llama4TextConfig(
        hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97, num_local_experts=1,
        attention_chunk_size=4, use_cache=False, attn_implementation="sdpa")).eval()
    lengths = [4, 6, 5, 5]
    ids = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(7))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        apart = torch.cat([chunked(input_ids=ids[:, a:b]).logits for a, b in zip(cu[:-1], cu[1:], strict=True)], 1)
        packed = chunked(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                         max_length_q=max(lengths), max_length_k=max(lengths)).logits
    assert padded_counted["padded"] == 0
    assert rel_err(packed, apart) < 1e-5


@pytest.mark.parametrize("path", ["varlen", "padded"])
@pytest.mark.parametrize(("family", "lengths"), [
    ("llama", [7, 13, 1, 22]), ("qwen3", [9, 4, 17]), ("gemma3", [5, 8, 3, 8])])  # gemma3: within its window of 8
def test_packed_batch_through_varlen_equals_sdpa_over_the_mask(family: str, lengths: list[int], path: str,
                                                               request: pytest.FixtureRequest) -> None:
    """Both padding-free paths: varlen flash (its contract, on CPU) and the CPU's padded causal sdpa."""
    calls = request.getfixturevalue("varlen_on_cpu" if path == "varlen" else "padded_counted")
    patch_varlen_attention()
    model = marked(tiny_model(family)).train()
    batch = packed_batch(lengths, seed=len(lengths))
    assert batch.cu_seq_lens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch.max_length == max(lengths)
    ref_loss, ref_grads = loss_and_grads(model, batch, padding_free=False)  # transformers' block-diagonal mask
    assert calls[path] == 0
    loss, grads = loss_and_grads(model, batch, padding_free=True)
    assert calls[path] == LAYERS
    assert rel_err(loss, ref_loss) < 1e-6
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


class HostReads(TorchDispatchMode):
    """Counts device-to-host reads (.item(), bool(tensor), ...: all dispatch to _local_scalar_dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("lengths", "kv_heads"), [([7, 1, 13, 4], 2), ([5], 6), ([3, 11], 1)])
def test_padded_causal_attention_is_each_sequence_on_its_own(lengths: list[int], kv_heads: int) -> None:
    """The CPU path against the contract it stands in for: forward and every input gradient, odd lengths, a
    one-token sequence, grouped-query heads, the last sequence shorter than the longest (its padding is clamped to
    the row's end), and no host read."""
    generator = torch.Generator().manual_seed(sum(lengths) + kv_heads)
    tokens, heads, head_dim = sum(lengths), 6, 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = [torch.randn(tokens, h, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(tokens, heads, head_dim, generator=generator, dtype=torch.float64)
    with HostReads() as reads:
        out = varlen_attention.padded_causal_attention(*inputs, cu, max(lengths), 0.3)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert reads.count == 0
    expected = reference_varlen(*inputs, cu, cu, max(lengths), max(lengths), 0.3)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    assert rel_err(out, expected) < 1e-12
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert rel_err(grad, expected_grad) < 1e-12


def test_the_trainer_passes_its_packed_batches_to_varlen(tiny_model_dir, embedded_tokenizer,
                                                         varlen_on_cpu: dict[str, int]) -> None:
    from lamelm_fast.train.config import TrainConfig, resolve
    from lamelm_fast.train.data import Record, encode_record
    from lamelm_fast.train.model import causal_lm_loss, load_model, load_model_config

    config = resolve(TrainConfig(model=str(tiny_model_dir), finetune="full"))
    model = load_model(config, load_model_config(config), torch.device("cpu")).model  # apply_kernels patches
    examples = [encode_record(Record(r, "x"), "alpaca", embedded_tokenizer, False) for r in embedded_records(3)]
    batch = collate(examples, packing=True, pad_token_id=0)
    with torch.no_grad():
        loss, correct = causal_lm_loss(model, batch, batch.num_targets, None)
        assert varlen_on_cpu["varlen"] == LAYERS
        masked = causal_lm_loss(model, dataclasses.replace(batch, cu_seq_lens=None), batch.num_targets, None)
    assert varlen_on_cpu["varlen"] == LAYERS and rel_err(loss, masked[0]) < 1e-6 and correct == masked[1]


def test_hf_flattening_collator_batches_reach_varlen_through_apply_kernels(varlen_on_cpu: dict[str, int]) -> None:
    """The README's promise for other trainers: apply_kernels, then HF's DataCollatorWithFlattening batches."""
    from transformers import DataCollatorWithFlattening

    from lamelm_fast import apply_kernels

    model = tiny_model("llama").train()
    reference = copy.deepcopy(model)
    assert apply_kernels(model).varlen_attention
    generator = torch.Generator().manual_seed(5)
    features = [{"input_ids": torch.randint(1, 97, (n,), generator=generator).tolist()} for n in (11, 4, 19)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    loss = model(**batch).loss  # our fused loss, our varlen attention
    loss.backward()
    assert varlen_on_cpu["varlen"] == LAYERS
    masked = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    expected = reference(**masked).loss  # transformers' own: sdpa over the block mask, its loss
    expected.backward()
    assert rel_err(loss.detach(), expected.detach()) < 1e-5
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert rel_err(param.grad, ref.grad) < 1e-4, name


def test_a_sliding_window_shorter_than_a_sequence_keeps_sdpa(varlen_on_cpu: dict[str, int]) -> None:
    patch_varlen_attention()
    model = marked(tiny_model("gemma3"))  # every layer of the 2-layer Gemma3 slides over 8 tokens
    batch = packed_batch([5, 11, 3], seed=3)
    ref_loss, _ = loss_and_grads(model, batch, padding_free=False)
    loss, _ = loss_and_grads(model, batch, padding_free=True)
    assert varlen_on_cpu["varlen"] == 0 and torch.equal(loss, ref_loss)


def test_sdpa_is_unchanged_where_varlen_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patch_varlen_attention()
    wrapper = ALL_ATTENTION_FUNCTIONS["sdpa"]
    patch_varlen_attention()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapper  # idempotent: wrapped once
    original = wrapper.lamelm_varlen_wrapped
    assert not hasattr(original, "lamelm_varlen_wrapped")
    model = tiny_model("llama")
    reference = copy.deepcopy(model)  # unmarked: its masks are built at once, as the original sdpa needs
    marked(model)
    batch = packed_batch([6, 10], seed=1)
    # The padding-free arguments are there, but neither path may run (on CPU the padded one would: switched off
    # here), so transformers' sdpa runs.
    monkeypatch.setattr(varlen_attention, "padded_supported", lambda *args: False)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    try:
        expected = loss_and_grads(reference, batch, padding_free=True)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = wrapper
    loss, grads = loss_and_grads(model, batch, padding_free=True)
    assert torch.equal(loss, expected[0])
    assert all(torch.equal(grads[n], expected[1][n]) for n in grads)


def test_only_packed_batches_carry_padding_free_arguments() -> None:
    examples = [Example([5, 6, 7], [False, True, True]), Example([8, 9], [False, True])]
    assert collate(examples, packing=False, pad_token_id=0).attention_kwargs() == {}
    moved = collate(examples, packing=True, pad_token_id=0).to(torch.device("cpu"))
    kwargs = moved.attention_kwargs()
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("weights", ["bf16", "fp32 under bf16 autocast"])
def test_torch_varlen_kernel_equals_sdpa_over_the_mask(family: str, weights: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, "flash_varlen_attention", "varlen")
    assert patch_varlen_attention(), "this torch has no varlen flash attention"
    autocast = weights != "bf16"
    model = marked(tiny_model(family)).to("cuda", torch.float32 if autocast else torch.bfloat16).train()
    batch = packed_batch([37, 130, 1, 64, 259], seed=4).to(torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ref_loss, ref_grads = loss_and_grads(model, batch, padding_free=False)
        loss, grads = loss_and_grads(model, batch, padding_free=True)
    assert calls["varlen"] == LAYERS
    assert rel_err(loss, ref_loss) < 1e-2
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 3e-2, name


def test_varlen_only_where_it_computes_what_sdpa_would(monkeypatch: pytest.MonkeyPatch) -> None:
    from lamelm_fast.ops.varlen_attention import varlen_supported

    module = torch.nn.Module()
    query = torch.zeros(1, 4, 10, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    plain = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 6, "max_length_k": 6}
    assert not varlen_supported(module, query, query, query, 0.0, plain)  # CPU fp32: no flash kernel
    monkeypatch.setattr(varlen_attention, "flash_runs", lambda device, dtype: True)
    assert varlen_supported(module, query, query, query, 0.0, plain)
    assert not varlen_supported(module, query, query, query, 0.0, {**plain, "max_length_k": None})  # args incomplete
    assert not varlen_supported(module, query, query, query, 0.1, plain)  # attention dropout
    for extra in ({"is_causal": False}, {"softcap": 50.0}, {"position_bias": torch.zeros(1)}, {"cache": object()},
                  {"sliding_window": 5}):
        assert not varlen_supported(module, query, query, query, 0.0, {**plain, **extra}), extra
    assert varlen_supported(module, query, query, query, 0.0, {**plain, "sliding_window": 6})  # window covers all
    module.is_causal = False  # an encoder's attention
    assert not varlen_supported(module, query, query, query, 0.0, plain)
    odd = torch.zeros(1, 4, 10, 12)
    assert not varlen_supported(torch.nn.Module(), odd, odd, odd, 0.0, plain)  # head size not a multiple of 8
    assert not varlen_supported(torch.nn.Module(), query, query, torch.zeros(1, 4, 10, 32), 0.0, plain)  # value's


def test_fp32_weights_under_bf16_autocast_run_varlen_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's GPU setups: fp32 weights (a full fine-tune's masters; QLoRA's fp32 embedding output) under bf16
    autocast give an fp32 query and key (RoPE's tables take the hidden states' dtype) and a bf16 value. sdpa computes
    that in bf16 (autocast), and so must the varlen path: it runs, in bf16, and agrees with sdpa over the mask."""
    seen: list[tuple[torch.dtype, ...]] = []

    def kernel(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return reference_varlen(query, key, value, *args, **kwargs)

    monkeypatch.setattr(varlen_attention, "flash_device", lambda device: True)  # only the device check is mocked
    monkeypatch.setattr(varlen_attention, "flash_varlen_attention", kernel)
    patch_varlen_attention()
    model = marked(tiny_model("llama")).train()
    batch = packed_batch([9, 14, 5], seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(model, batch, padding_free=False)
        assert not seen
        loss, grads = loss_and_grads(model, batch, padding_free=True)
    assert seen == [(torch.bfloat16,) * 3] * LAYERS
    assert rel_err(loss, ref_loss) < 1e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and rel_err(grad, ref_grads[name]) < 5e-2, name


def test_attention_dtype_is_what_sdpa_computes_in() -> None:
    from lamelm_fast.ops.varlen_attention import attention_dtype, flash_runs

    fp32, bf16 = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16)
    assert attention_dtype(bf16, bf16, bf16) == torch.bfloat16
    assert attention_dtype(fp32, fp32, bf16) is None  # sdpa refuses mixed dtypes outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_dtype(fp32, fp32, bf16) == torch.bfloat16
    assert not flash_runs(torch.device("cpu"), torch.bfloat16)  # no flash kernel on the CPU


class SquareTensors(TorchDispatchMode):
    """Counts the tensors created with a [..., T, T] shape: transformers' block mask of a T-token packed row."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens, self.count = tokens, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-2:] == (self.tokens, self.tokens):
            self.count += 1
        return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_block_mask_is_built_only_where_a_layer_falls_back_to_sdpa(family: str, monkeypatch: pytest.MonkeyPatch,
                                                                       ) -> None:
    from lamelm_fast import apply_kernels

    builds = {"count": 0}
    get = varlen_attention.DeferredMask.get

    def counted_get(self):
        builds["count"] += self._build is not None
        return get(self)

    monkeypatch.setattr(varlen_attention.DeferredMask, "get", counted_get)
    model = tiny_model(family).train()
    reference = copy.deepcopy(model)  # never given to apply_kernels: its masks are built at once, as before
    apply_kernels(model, cross_entropy=False, lora=False, swiglu=False, rms_norm=False, rope=False)
    batch = packed_batch([5, 8, 3, 7], seed=6)
    tokens = batch.input_ids.shape[1]
    with SquareTensors(tokens) as squares:
        expected, _ = loss_and_grads(reference, batch, padding_free=False)
    assert squares.count > 0 and builds["count"] == 0

    with SquareTensors(tokens) as squares:  # every layer runs the CPU's padded path: no [T, T] tensor at all
        loss, _ = loss_and_grads(model, batch, padding_free=True)
    assert squares.count == 0 and builds["count"] == 0
    assert rel_err(loss, expected) < 1e-6

    with monkeypatch.context() as patch:  # every layer falls back, so the mask is built, once per mask kind
        patch.setattr(varlen_attention, "padded_supported", lambda *args: False)
        with SquareTensors(tokens) as squares:
            loss, _ = loss_and_grads(model, batch, padding_free=True)
    assert squares.count > 0 and builds["count"] == 1  # (tiny Gemma3's layers all slide: its full mask is unused)
    assert torch.equal(loss, expected)

    monkeypatch.setattr(varlen_attention, "flash_runs", lambda device, dtype: True)
    monkeypatch.setattr(varlen_attention, "flash_varlen_attention", reference_varlen)
    builds["count"] = 0
    with SquareTensors(tokens) as squares:  # every layer runs varlen: no [T, T] tensor at all
        loss, _ = loss_and_grads(model, batch, padding_free=True)
    assert squares.count == 0 and builds["count"] == 0
    assert rel_err(loss, expected) < 1e-6


def test_generation_masks_are_not_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() passes a 2-D padding mask, and transformers may hand the mask it makes back to the model (static
    caches): such masks are built at once."""
    from lamelm_fast import apply_kernels

    deferred = []
    init = varlen_attention.DeferredMask.__init__

    def counted_init(self, build):
        deferred.append(build)
        init(self, build)

    monkeypatch.setattr(varlen_attention.DeferredMask, "__init__", counted_init)
    model = tiny_model("llama").eval()
    reference = copy.deepcopy(model)
    apply_kernels(model, cross_entropy=False, lora=False, swiglu=False, rms_norm=False, rope=False)
    prompt = torch.tensor([[5, 9, 2, 7, 11]])
    for cache in ("dynamic", "static"):  # a static cache's masks are made outside the forward and handed to it
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, cache_implementation=cache)
        expected = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                      do_sample=False, cache_implementation=cache)
        assert torch.equal(out, expected) and not deferred, cache


def test_packed_rows_are_known_by_the_callers_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers reads on the host whether positions restart; a patched model takes its caller's word instead,
    with the same masks: packed where the padding-free arguments say so (a row of one sequence included), plain where
    the model makes the positions itself, transformers' own check where positions come alone."""
    from transformers import masking_utils

    from lamelm_fast import apply_kernels

    checked = []
    model = tiny_model("llama").train()
    reference = copy.deepcopy(model)
    apply_kernels(model, cross_entropy=False, lora=False, swiglu=False, rms_norm=False, rope=False)
    original = masking_utils.find_packed_sequence_indices.lamelm_packed_by_word  # transformers' own
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", varlen_attention._packed_by_word(
        lambda position_ids: checked.append(position_ids) or original(position_ids)))
    for lengths in ([5, 8, 3], [9]):
        batch = packed_batch(lengths, seed=len(lengths))
        expected, expected_grads = loss_and_grads(reference, batch, padding_free=False)
        checked.clear()
        loss, grads = loss_and_grads(model, batch, padding_free=True)
        assert not checked and rel_err(loss, expected) < 1e-6
        assert all(rel_err(grads[name], grad) < 1e-5 for name, grad in expected_grads.items())
    plain = dataclasses.replace(batch, position_ids=None)
    loss, _ = loss_and_grads(model, plain, padding_free=False)
    assert not checked and torch.equal(loss, expected)  # one sequence: the positions the model makes are the same
    loss, _ = loss_and_grads(model, batch, padding_free=False)
    assert len(checked) == 1 and torch.equal(loss, expected)


def test_packed_row_marks_are_per_thread_and_undone_by_any_exception() -> None:
    """Two threads in one patched model (a threaded server, DataParallel's replicas) each keep their own mark, and a
    KeyboardInterrupt inside the forward leaves none behind for later masks of other models."""
    import threading
    import time

    from lamelm_fast import apply_kernels

    model = tiny_model("llama").eval()
    apply_kernels(model, cross_entropy=False, lora=False)
    ids = torch.randint(1, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    barrier, errors = threading.Barrier(2), []

    def hold(module, args):
        barrier.wait()  # both threads inside the decoder's forward
        if threading.current_thread().name == "late":
            time.sleep(0.2)  # the thread that entered last leaves last

    hook = model.model.layers[0].register_forward_pre_hook(hold)

    def run() -> None:
        try:
            with torch.no_grad():
                model(input_ids=ids)
        except Exception as error:  # noqa: BLE001 (the test reports any)
            errors.append(error)

    early = threading.Thread(target=run, name="early")
    early.start()
    time.sleep(0.1)
    late = threading.Thread(target=run, name="late")
    late.start()
    early.join()
    late.join()
    hook.remove()
    assert not errors

    def interrupt(module, args):
        raise KeyboardInterrupt

    hook = model.model.layers[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(input_ids=ids)
    hook.remove()
    assert varlen_attention._PACKED_ROWS.get() is None
