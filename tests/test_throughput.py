"""Parameter counts, FLOPs per token, device peaks and MFU."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_llama_config
from lamelm_fast.metrics.throughput import PEAK_BF16_TFLOPS, count_parameters, flops_per_token, mfu, peak_flops


def build(tied: bool, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(256, tie_word_embeddings=tied, **overrides))


def hand_counts(model: torch.nn.Module, tied: bool) -> tuple[int, int, int]:
    """By parameter name: the input embedding is lookup-only unless the LM head shares it."""
    trainable = frozen = embedding = 0
    for name, param in model.named_parameters():
        if name.endswith("embed_tokens.weight") and not tied:
            embedding += param.numel()
        elif param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen, embedding


@pytest.mark.parametrize("tied", [False, True])
def test_count_parameters_full_model(tied: bool) -> None:
    model = build(tied)
    vocab, hidden = 256, 64
    trainable, frozen, embedding = count_parameters(model)
    assert (trainable, frozen, embedding) == hand_counts(model, tied)
    # The tied matrix is counted once, as the LM head's matmul weight; untied, the head is separate.
    total = sum(p.numel() for p in model.parameters())
    assert trainable + embedding == total and frozen == 0
    assert embedding == (0 if tied else vocab * hidden)
    assert total == (sum(p.numel() for p in build(False).parameters()) - (vocab * hidden if tied else 0))


@pytest.mark.parametrize("tied", [False, True])
def test_count_parameters_frozen_split_and_lora(tied: bool) -> None:
    from peft import LoraConfig, get_peft_model

    model = build(tied)
    for layer in model.model.layers[:1]:
        layer.requires_grad_(False)
    assert count_parameters(model) == hand_counts(model, tied)
    assert count_parameters(model)[1] == sum(p.numel() for p in model.model.layers[0].parameters())

    lora = get_peft_model(build(tied), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable, frozen, embedding = count_parameters(lora)
    assert (trainable, frozen, embedding) == hand_counts(lora, tied)
    # Only the adapters train: 2 layers x 2 projections x (A: r x 64 + B: out x r), q out 64, v out 32.
    assert trainable == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert frozen + embedding == sum(p.numel() for p in build(tied).parameters())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_count_parameters_counts_4bit_weights_logically(tmp_path: Path) -> None:
    from transformers import BitsAndBytesConfig

    reference = build(False)
    reference.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    quantized = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    packed = quantized.model.layers[0].self_attn.q_proj.weight
    assert packed.numel() < 64 * 64  # really packed, so counting numel would be wrong
    quantized.requires_grad_(False)
    reference.requires_grad_(False)
    assert count_parameters(quantized) == count_parameters(reference)


def expected_flops(config: LlamaConfig, trainable: int, frozen: int, seq_len: float, head_dim: int) -> float:
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    return 6 * trainable + 4 * frozen + 12 * layers * heads * head_dim * seq_len


def test_flops_per_token_matches_the_formula() -> None:
    from peft import LoraConfig, get_peft_model

    model = build(False)
    config = model.config
    counts = count_parameters(model)
    trainable, frozen, embedding = counts
    assert flops_per_token(config, *counts, seq_len=100) == pytest.approx(
        expected_flops(config, trainable, frozen, 100, head_dim=64 // 4))
    # Non-integer mean lengths are fine, and the attention term grows linearly with them.
    assert flops_per_token(config, *counts, seq_len=37.5) == pytest.approx(
        6 * trainable + 12 * 2 * 4 * 16 * 37.5)
    # Lookup-only embeddings cost nothing.
    assert flops_per_token(config, trainable, frozen, embedding + 10**9, 100) == flops_per_token(config, *counts, 100)

    lora = get_peft_model(build(False), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora_counts = count_parameters(lora)
    assert lora_counts[1] > 0
    assert flops_per_token(lora.config, *lora_counts, 64) == pytest.approx(
        6 * lora_counts[0] + 4 * lora_counts[1] + 12 * 2 * 4 * 16 * 64)
    # A frozen base costs two thirds of a trained one per weight.
    assert flops_per_token(config, 0, trainable, 0, 0) == pytest.approx(flops_per_token(config, trainable, 0, 0, 0)
                                                                        * 2 / 3)


def test_flops_per_token_reads_head_dim_and_text_config() -> None:
    from transformers import LlavaConfig

    config = tiny_llama_config(256, head_dim=32)  # head_dim wider than hidden_size / heads
    assert flops_per_token(config, 1000, 0, 0, 10) == pytest.approx(6000 + 12 * 2 * 4 * 32 * 10)
    nested = LlavaConfig(text_config=tiny_llama_config(256, num_hidden_layers=3).to_dict())
    assert flops_per_token(nested, 0, 0, 0, 10) == pytest.approx(12 * 3 * 4 * 16 * 10)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181), ("NVIDIA A10G", 70), ("NVIDIA A10", 125), ("Tesla T4", 65), ("Tesla V100-SXM2-16GB", 125),
    ("Tesla V100-PCIE-32GB", 112), ("Tesla V100S-PCIE-32GB", 130), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 3090", 71),
    ("NVIDIA RTX 6000 Ada Generation", 364.2), ("NVIDIA RTX A6000", 154.8),
])
def test_peak_flops_lookup(name: str, tflops: float) -> None:
    assert peak_flops(name) == pytest.approx(tflops * 1e12)


def test_peak_flops_unknown_and_override() -> None:
    assert peak_flops("Intel Xeon") is None and peak_flops(None) is None
    assert peak_flops("NVIDIA RTX A1000") is None  # not the A10
    assert peak_flops("Quadro GV100") is None  # not the V100
    assert peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    assert peak_flops(None, override_tflops=1.5) == 1.5e12
    with pytest.raises(ValueError):
        peak_flops("NVIDIA L4", override_tflops=0)
    assert all(value > 0 for value in PEAK_BF16_TFLOPS.values())


def test_mfu_arithmetic() -> None:
    assert mfu(10_000, 6e9, 989e12) == pytest.approx(6e13 / 989e12)
    assert mfu(1000, 1e9, 2e12) == pytest.approx(0.5)
    assert mfu(1000, 1e9, None) is None


def test_estimate_gives_plausible_cpu_throughput() -> None:
    """Units check, not a benchmark: estimated FLOPs over measured time lands in a CPU's range (1 GFLOP/s to 10
    TFLOP/s; this model reaches tens of GFLOP/s on one core)."""
    # One thread and the fastest step: when other processes hold the cores, multi-threaded ops stall at every
    # barrier waiting for a descheduled thread, which measures the machine's load instead of the estimate.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build(False, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
        batch, seq_len = 2, 64
        input_ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(7):
            start = time.perf_counter()
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    best = min(times[2:])  # the first steps warm up the allocator and kernels
    achieved = flops_per_token(model.config, *count_parameters(model), seq_len) * batch * seq_len / best
    assert 1e9 < achieved < 1e13, f"{achieved / 1e9:.1f} GFLOP/s"
