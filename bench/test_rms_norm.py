"""Fused RMSNorm: fwd+bwd time and peak memory against transformers' ``LlamaRMSNorm`` (eager) and Liger-Kernel's
``LigerRMSNorm`` (when installed), at 8k and 16k tokens, hidden 2048 (Llama-3.2-1B) and 4096 (Llama-3-8B).

Variants: ``qlora``: fp32 activations and a frozen fp32 weight (the residual stream after PEFT's
prepare_model_for_kbit_training, norms frozen), so no weight gradient; ``full``: bf16 activations and a trainable bf16
weight. Each row also gives the bandwidth floor: the forward reads x and writes y, the backward reads x and dy and
writes dx, at the device's measured copy bandwidth. Predictions: bench/NOTES-rms-norm.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import harness
import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lamelm_fast.ops.rms_norm import rms_norm

EPS = 1e-5
VARIANTS = {"qlora": (torch.float32, torch.float32, False), "full": (torch.bfloat16, torch.bfloat16, True)}
if torch.cuda.is_available():
    CASES = [(tokens, hidden, variant) for variant in VARIANTS for hidden in (2048, 4096) for tokens in (8192, 16_384)]
else:  # the CPU run keeps the suite alive: small shapes, torch reference path
    CASES = [(256, 384, variant) for variant in VARIANTS]


def candidates(weight: nn.Parameter) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each implementation as a function of x, all sharing ``weight``."""
    hidden = weight.shape[0]
    hf = LlamaRMSNorm(hidden, eps=EPS).to(weight.device)
    hf.weight = weight
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "lamelm": lambda x: rms_norm(x, weight, EPS), "hf": hf}
    if importlib.util.find_spec("liger_kernel") is not None and weight.is_cuda:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        liger = LigerRMSNorm(hidden, eps=EPS, offset=0.0, casting_mode="llama").to(weight.device)
        liger.weight = weight  # its default in_place=True backward writes dx over dy: each run gets a fresh dy
        found["liger"] = liger
    return found


@pytest.mark.parametrize(("tokens", "hidden", "variant"), CASES)
def test_rms_norm(benchmark, device: torch.device, peaks: dict[str, float], tokens: int, hidden: int,
                  variant: str) -> None:
    x_dtype, w_dtype, weight_grad = VARIANTS[variant]
    gen = torch.Generator(device=device).manual_seed(0)
    x = (2 * torch.randn(tokens, hidden, device=device, generator=gen)).to(x_dtype).requires_grad_()
    weight = nn.Parameter((1 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(w_dtype),
                          requires_grad=weight_grad)
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    pristine_grad = torch.randn(tokens, hidden, device=device, generator=gen).to(out_dtype)
    grad = pristine_grad.clone()

    def reset() -> None:
        grad.copy_(pristine_grad)  # Liger overwrote it with dx
        x.grad = weight.grad = None

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return lambda: fn(x).backward(grad)

    row: dict[str, object] = {"tokens": tokens, "hidden": hidden, "variant": variant,
                              "dtype": f"{str(x_dtype).removeprefix('torch.')}/{str(w_dtype).removeprefix('torch.')}",
                              "weight_grad": weight_grad}
    # Forward: read x, write y. Backward: read x and dy, write dx (the weight gradient's partial sums are not counted).
    must_move = tokens * hidden * (3 * x.element_size() + 2 * pristine_grad.element_size())
    floor_ms = must_move / peaks["copy_bytes_per_second"] * 1e3
    row["must_move_mb"] = must_move / 2**20
    harness.measure_against(row, {name: step(fn) for name, fn in candidates(weight).items()}, device,
                            floor=("bandwidth_floor", floor_ms), warmup=5, repeats=50 if device.type == "cuda" else 5,
                            setup=reset)
    harness.record("rms_norm", row)
    benchmark.extra_info.update(row)

    def ours_once() -> None:
        reset()
        rms_norm(x, weight, EPS).backward(grad)

    benchmark.pedantic(harness.synchronized(ours_once, device), rounds=5, iterations=1, warmup_rounds=1)
