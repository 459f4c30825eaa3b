"""Fused linear cross-entropy: fwd+bwd time and peak memory against PyTorch eager, torch.compile and Liger-Kernel.

Targets (H100, bf16): time <= 0.9x eager, peak memory <= 0.1x eager, >= 2x faster than Liger's FLCE. Each row
also gives the matmul floor, 6*N*H*V FLOPs at the device's measured bf16 matmul rate, and how close we are to it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import harness
import pytest
import torch
import torch.nn.functional as F

from lamelm_fast.ops import fused_linear_cross_entropy

if torch.cuda.is_available():
    CASES = [(h, v, n) for h in (2048, 4096) for v in (32_000, 128_256) for n in (4096, 8192, 16_384, 32_768)]
    DTYPE = torch.bfloat16
else:  # the CPU run keeps the suite alive: tiny shapes, torch reference path
    CASES = [(64, 1000, 256)]
    DTYPE = torch.float32


def eager(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # What HF models do: bf16 Linear, logits upcast to fp32, cross_entropy.
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)




def liger() -> Callable[..., torch.Tensor] | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, labels: loss(weight, hidden, labels)


def candidates() -> dict[str, Callable[..., torch.Tensor]]:
    found: dict[str, Callable[..., torch.Tensor]] = {"lamelm": fused_linear_cross_entropy, "eager": eager}
    if torch.cuda.is_available():  # (candidates() is called once per case; on CPU compiling would only cost time)
        found["torch_compile"] = harness.compiled_for_one_case(eager)
    peer = liger()
    if peer is not None:
        found["liger"] = peer
    return found


@pytest.mark.parametrize(("hidden_size", "vocab", "tokens"), CASES)
def test_fused_linear_cross_entropy(benchmark, device: torch.device, peaks: dict[str, float], hidden_size: int,
                                    vocab: int, tokens: int) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).to(DTYPE).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen) / hidden_size**0.5).to(DTYPE)
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    labels[torch.rand(tokens, device=device, generator=gen) < 0.3] = -100  # prompt tokens carry no loss

    def clear() -> None:
        hidden.grad = weight.grad = None

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        return lambda: fn(hidden, weight, labels).backward()

    row: dict[str, object] = {"hidden": hidden_size, "vocab": vocab, "tokens": tokens, "dtype": str(DTYPE)}
    floor_ms = 6 * tokens * hidden_size * vocab / peaks["matmul_flops"] * 1e3
    harness.measure_against(row, {name: step(fn) for name, fn in candidates().items()}, device,
                            floor=("matmul_floor", floor_ms), warmup=3, repeats=20 if device.type == "cuda" else 5,
                            setup=clear)
    harness.record("fused_linear_cross_entropy", row)
    benchmark.extra_info.update(row)

    def ours() -> None:
        clear()
        fused_linear_cross_entropy(hidden, weight, labels).backward()

    benchmark.pedantic(harness.synchronized(ours, device), rounds=5, iterations=1, warmup_rounds=1)
