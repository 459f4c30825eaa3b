"""4-bit LoRA projections: fwd+bwd time and peak memory against PEFT + bitsandbytes and the bf16 floor.

Per Llama-3.2-1B projection shape (hidden 2048, intermediate 8192, kv 512; r = 16; bf16 autocast as the trainer
runs QLoRA; fp32 adapter weights as PEFT keeps them): ours (PEFT's layer patched by patch_peft_lora4bit), PEFT's
LoRA over a bitsandbytes NF4 Linear4bit (double quantization), and the floor: bf16 ``F.linear`` on the already
dequantized weight plus the same LoRA. Targets (H100): >= 1.5x faster than PEFT + bitsandbytes, <= 1.2x the floor.
Each row also gives the dense-matmul roofline (FLOPs at the device's measured bf16 rate). A decode case (a few
tokens, forward only) times the GEMV path against bitsandbytes' inference kernel.

On a GPU our layer runs three times per row: as shipped (``LAMELM_NF4_MATMUL=auto``, the ``lamelm`` columns, with
the strategies auto picked), and pinned to each strategy (``lamelm_fused``, ``lamelm_dequant``). The strategy sweep
times the base product alone (forward and input gradient, LoRA epilogue included) for both strategies and plain
cuBLAS on the dequantized weight over a range of token counts, and records from how many tokens on dequantize +
cuBLAS wins: the threshold ``auto`` should find.
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

from lamelm_fast.kernels import nf4_lora
from lamelm_fast.ops import nf4_matmul
from lamelm_fast.ops.dispatch import triton_interpreted, use_nf4_matmul
from lamelm_fast.ops.lora4bit import patch_peft_lora4bit
from lamelm_fast.ops.quant4bit import Packed4bit, dequantize

RANK = 16
ON_GPU = torch.cuda.is_available()
# (name, in_features, out_features): q/o, k/v, gate/up, down
PROJECTIONS = [("q_o", 2048, 2048), ("k_v", 2048, 512), ("gate_up", 2048, 8192), ("down", 8192, 2048)]
if ON_GPU:
    CASES = [(p, tokens) for p in PROJECTIONS for tokens in (4096, 8192, 16_384)]
    DECODE = [(p, tokens) for p in PROJECTIONS for tokens in (1, 4)]
    SWEEP_PROJECTIONS, SWEEP_TOKENS = PROJECTIONS, (512, 1024, 2048, 4096, 8192, 16_384)
    # Activations as the bench's layers get them (bf16) and as the trainer's QLoRA model does (fp32: its norms run
    # in fp32 after prepare_model_for_kbit_training; bf16 compute under autocast, fp32 results).
    SWEEP_ACTIVATIONS = (torch.bfloat16, torch.float32)
    STRATEGIES = ("fused", "dequant")  # pinned runs of our layer beside the auto one
else:  # the CPU run keeps the suite alive: tiny shapes, torch reference path, seconds in all
    CASES = [(("tiny", 128, 96), 64)]
    DECODE = [(("tiny", 128, 96), 1)]
    # The strategies are Triton-backend ones: on CPU they run in the interpreter (fp32), at two tiny sizes.
    SWEEP_PROJECTIONS, SWEEP_TOKENS = [("tiny", 128, 96)], (8, 64)
    SWEEP_ACTIVATIONS = (torch.float32,)
    STRATEGIES = ()

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


def _auto_choices(row: dict[str, object], in_features: int, out_features: int, tokens: int) -> None:
    """What ``auto`` decided for this row's forward and input-gradient products (absent: not decided)."""
    settled = nf4_matmul.settled_strategy("auto", tokens)
    if settled != "auto":
        row["auto_forward"] = row["auto_input_grad"] = f"{settled} (untimed, rows rule)"
        return
    for key, choice in nf4_matmul.CACHE.items():
        shape = (out_features, in_features) if key.weight_transposed else (in_features, out_features)
        if key.m_bucket == nf4_matmul.m_bucket(tokens) and (key.p, key.q) == shape:
            row[f"auto_{'forward' if key.weight_transposed else 'input_grad'}"] = choice


def _compare(row: dict[str, object], names: list[str]) -> None:
    ours = row["lamelm_ms"]
    if not isinstance(ours, float):  # ours "oom": the row keeps the others' numbers
        return
    for name in names:
        if name != "lamelm" and isinstance(row.get(f"{name}_ms"), float):
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ours
            harness.compare_memory(row, name)


@pytest.mark.parametrize(("projection", "tokens"), CASES, ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_nf4_lora_fwd_bwd(benchmark, device: torch.device, peaks: dict[str, float], projection: tuple,
                          tokens: int) -> None:
    name, in_features, out_features = projection
    layers = _layers(in_features, out_features, device)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def step(layer: nn.Module, strategy: str | None = None) -> Callable[[], None]:
        def run() -> None:
            # The strategy is read in the forward and kept for the backward.
            with _autocast(device), nullcontext() if strategy is None else use_nf4_matmul(strategy):
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
    for strategy in STRATEGIES:
        harness.measure_into(row, f"lamelm_{strategy}", step(layers["lamelm"], strategy), device, warmup=3,
                             repeats=20, setup=clear)
    _compare(row, list(layers))
    if isinstance(row.get("lamelm_fused_ms"), float) and isinstance(row.get("lamelm_dequant_ms"), float):
        row["speedup_dequant_vs_fused"] = row["lamelm_fused_ms"] / row["lamelm_dequant_ms"]
    _auto_choices(row, in_features, out_features, tokens)
    if isinstance(row["lamelm_ms"], float):
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


def _strategy_row(w: Packed4bit, dense: torch.Tensor, tokens: int, weight_transposed: bool, activations: torch.dtype,
                  device: torch.device) -> tuple[dict[str, object], Callable[[], object]]:
    """Times of one product by each strategy (from ``activations``, in dense's dtype, into ``activations``: as the
    op calls it) and by a plain matmul on ``dense`` (op(W), already dequantized; operands and result in its
    dtype), and the product as ``auto`` runs it."""
    dtype = dense.dtype
    inner, outer = dense.shape
    a = torch.randn(tokens, inner, device=device, dtype=activations)
    lora = (torch.randn(tokens, RANK, device=device, dtype=dtype),
            torch.randn(outer, RANK, device=device, dtype=dtype).t())  # strided, as the op passes B^T or A
    out = torch.empty(tokens, outer, device=device, dtype=activations)
    a_mm, out_mm = a.to(dtype), torch.empty(tokens, outer, device=device, dtype=dtype)
    options = {"warmup": 2, "repeats": 10} if ON_GPU else {"warmup": 1, "repeats": 2}

    def product(strategy: str) -> Callable[[], object]:
        return lambda: nf4_matmul.matmul_4bit_lora(a, w, strategy=strategy, dtype=dtype,
                                                   weight_transposed=weight_transposed, lora=lora, scale=2.0, out=out)

    def dequant_with(placement: str) -> Callable[[], object]:
        return lambda: nf4_lora.dequant_matmul_4bit_lora(a, w, dtype=dtype, weight_transposed=weight_transposed,
                                                         lora=lora, scale=2.0, out=out, placement=placement)

    # dequant: the LoRA placement its byte rule picks (one of the two pinned ones timed beside it).
    row: dict[str, object] = {"tokens": tokens, "activations": str(activations), "dtype": str(dtype),
                              "placement": nf4_lora.lora_placement(activations, dtype, inner, outer, RANK)}
    for strategy in nf4_matmul.STRATEGIES:
        harness.measure_into(row, strategy, product(strategy), device, **options)
    for placement in ("concat", "addmm"):
        harness.measure_into(row, f"dequant_{placement}", dequant_with(placement), device, **options)
    floor = harness.measure_into(row, "cublas_bf16" if ON_GPU else "torch_mm",
                                 lambda: torch.mm(a_mm, dense, out=out_mm), device, **options)
    timings = {s: row[f"{s}_ms"] if isinstance(row[f"{s}_ms"], float) else float("inf")
               for s in nf4_matmul.STRATEGIES}
    row["speedup_dequant_vs_fused"] = timings["fused"] / timings["dequant"]
    if floor is not None:
        for strategy in nf4_matmul.STRATEGIES:
            row[f"time_vs_mm_{strategy}"] = timings[strategy] / floor.median_ms
    row["faster"] = nf4_matmul.faster(timings)
    return row, product("auto")


@pytest.mark.parametrize("activations", SWEEP_ACTIVATIONS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("direction", ["forward", "input_grad"])
@pytest.mark.parametrize("projection", SWEEP_PROJECTIONS, ids=lambda p: p[0])
def test_nf4_matmul_strategies(benchmark, device: torch.device, projection: tuple, direction: str,
                               activations: torch.dtype) -> None:
    """The base product of one projection (``x @ W^T + s xa B^T``, or ``dy @ W + s (dy B) A``) by each strategy and
    by a plain matmul on the already dequantized weight, over token counts; records from how many tokens on
    dequantize + cuBLAS wins (``dequant_from_tokens``: the smallest count from which it wins, by more than auto's
    margin, at every larger count; None: fused wins at the largest)."""
    if not ON_GPU and not triton_interpreted():
        pytest.skip("the strategies run Triton kernels: on CPU only under TRITON_INTERPRET=1")
    name, in_features, out_features = projection
    weight_transposed = direction == "forward"
    base = _layers(in_features, out_features, device)["lamelm"].get_base_layer()
    w = Packed4bit.from_bnb(base.weight, base.weight.quant_state)
    dense = dequantize(w, torch.bfloat16 if ON_GPU else torch.float32)  # fp32 on CPU: the interpreter's bf16 dot
    dense = dense.t() if weight_transposed else dense
    rows = []
    for tokens in SWEEP_TOKENS:
        row, auto = _strategy_row(w, dense, tokens, weight_transposed, activations, device)
        rows.append({"projection": name, "direction": direction, "in": in_features, "out": out_features, **row})
    threshold = None
    for row in reversed(rows):
        if row["faster"] != "dequant":
            break
        threshold = row["tokens"]
    for row in rows:
        row["dequant_from_tokens"] = threshold
        harness.record("nf4_matmul_strategy", row)
    benchmark.extra_info.update({"projection": name, "direction": direction, "activations": str(activations),
                                 "dequant_from_tokens": threshold,
                                 "speedup_dequant_vs_fused": {r["tokens"]: r["speedup_dequant_vs_fused"]
                                                              for r in rows}})
    benchmark.pedantic(harness.synchronized(auto, device), rounds=5 if ON_GPU else 1, iterations=1,
                       warmup_rounds=1)
