"""4-bit LoRA projections: fwd+bwd time and peak memory against PEFT + bitsandbytes and the bf16 floor.

Per Llama-3.2-1B projection shape (hidden 2048, intermediate 8192, kv 512; r = 16; bf16 autocast as the trainer
runs QLoRA; fp32 adapter weights as PEFT keeps them): ours (PEFT's layer patched by patch_peft_lora4bit), PEFT's
LoRA over a bitsandbytes NF4 Linear4bit (double quantization), and the floor: bf16 ``F.linear`` on the already
dequantized weight plus the same LoRA. Targets (H100): >= 1.5x faster than PEFT + bitsandbytes, <= 1.2x the floor.
Each row also gives the dense-matmul roofline (FLOPs at the device's measured bf16 rate). A decode case (a few
tokens, forward only) times the GEMV path against bitsandbytes' inference kernel.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from contextlib import nullcontext

import harness
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lamelm_fast.ops.lora4bit import patch_peft_lora4bit
from lamelm_fast.ops.quant4bit import Packed4bit, dequantize

RANK = 16
ON_GPU = torch.cuda.is_available()
# (name, in_features, out_features): q/o, k/v, gate/up, down
PROJECTIONS = [("q_o", 2048, 2048), ("k_v", 2048, 512), ("gate_up", 2048, 8192), ("down", 8192, 2048)]
if ON_GPU:
    CASES = [(p, tokens) for p in PROJECTIONS for tokens in (4096, 8192, 16_384)]
    DECODE = [(p, tokens) for p in PROJECTIONS for tokens in (1, 4)]
else:  # the CPU run keeps the suite alive: tiny shapes, torch reference path, seconds in all
    CASES = [(("tiny", 128, 96), 64)]
    DECODE = [(("tiny", 128, 96), 1)]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed: the NF4 storage, our layer (PEFT's, patched) "
                                       "and the PEFT + bitsandbytes baseline all come from it")


class _Holder(nn.Module):
    is_loaded_in_4bit = True  # PEFT gives a Linear4bit its bitsandbytes LoRA class, as in a HF 4-bit model

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


class _Floor(nn.Module):
    """bf16 weight already dequantized (nothing 4-bit left) plus the same LoRA: the best a 4-bit layer can do."""

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.lora_a, self.lora_b, self.scale = nn.Parameter(lora_a), nn.Parameter(lora_b), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def _layers(in_features: int, out_features: int, device: torch.device) -> dict[str, nn.Module]:
    import bitsandbytes as bnb
    import peft

    torch.manual_seed(0)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    base = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                             compress_statistics=True)
    base.load_state_dict({"weight": torch.randn(out_features, in_features) / in_features**0.5})
    base = base.to(device)
    base.support_avx512bf16_for_cpu = False  # keep bitsandbytes' standard layout on CPU
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"])
    reference = peft.inject_adapter_in_model(config, _Holder(base)).proj
    nn.init.normal_(reference.lora_B["default"].weight, std=0.02)
    ours = copy.deepcopy(reference)
    assert patch_peft_lora4bit(_Holder(ours)) == 1
    weight = dequantize(Packed4bit.from_bnb(base.weight, base.weight.quant_state), dtype)
    floor = _Floor(weight, reference.lora_A["default"].weight.detach().clone(),
                   reference.lora_B["default"].weight.detach().clone(), reference.scaling["default"])
    return {"lamelm": ours, "peft_bnb": reference, "bf16_floor": floor}


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _compare(row: dict[str, object], names: list[str]) -> None:
    ours = row["lamelm_ms"]
    for name in names:
        if name != "lamelm" and isinstance(row.get(f"{name}_ms"), float):
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ours
            if row.get("lamelm_peak_mb") and row.get(f"{name}_peak_mb"):
                row[f"memory_vs_{name}"] = row["lamelm_peak_mb"] / row[f"{name}_peak_mb"]


@pytest.mark.parametrize(("projection", "tokens"), CASES, ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_nf4_lora_fwd_bwd(benchmark, device: torch.device, peaks: dict[str, float], projection: tuple,
                          tokens: int) -> None:
    name, in_features, out_features = projection
    layers = _layers(in_features, out_features, device)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with _autocast(device):
                y = layer(x)
            y.backward(grad)
        return run

    def clear() -> None:
        x.grad = None
        for layer in layers.values():
            layer.zero_grad(set_to_none=True)

    # Base forward + input gradient (2 x 2MNK) and the six rank-r products of the adapter's forward and backward.
    flops = 4 * tokens * in_features * out_features + 6 * tokens * RANK * (in_features + out_features)
    row: dict[str, object] = {"projection": name, "in": in_features, "out": out_features, "tokens": tokens,
                              "rank": RANK, "dtype": str(dtype), "roofline_ms": flops / peaks["matmul_flops"] * 1e3}
    for label, layer in layers.items():
        harness.measure_into(row, label, step(layer), device, warmup=3, repeats=20 if ON_GPU else 3, setup=clear)
    _compare(row, list(layers))
    row["roofline_fraction"] = row["roofline_ms"] / row["lamelm_ms"]
    harness.record("nf4_lora_fwd_bwd", row)
    benchmark.extra_info.update(row)
    ours = step(layers["lamelm"])
    benchmark.pedantic(harness.synchronized(lambda: (clear(), ours()), device), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize(("projection", "tokens"), DECODE, ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_nf4_lora_decode(benchmark, device: torch.device, peaks: dict[str, float], projection: tuple,
                         tokens: int) -> None:
    name, in_features, out_features = projection
    layers = _layers(in_features, out_features, device)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), _autocast(device):
                layer(x)
        return run

    for layer in layers.values():
        layer.eval()
    # Memory-bound: the 4-bit weight (plus one fp32 scale per 64 values, nested: one byte) read once.
    weight_bytes = in_features * out_features * (0.5 + 1 / 64)
    row: dict[str, object] = {"projection": name, "in": in_features, "out": out_features, "tokens": tokens,
                              "bandwidth_floor_ms": weight_bytes / peaks["copy_bytes_per_second"] * 1e3}
    for label, layer in layers.items():
        harness.measure_into(row, label, step(layer), device, warmup=5, repeats=50 if ON_GPU else 5)
    _compare(row, list(layers))
    harness.record("nf4_lora_decode", row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(harness.synchronized(step(layers["lamelm"]), device), rounds=10, iterations=1, warmup_rounds=1)
