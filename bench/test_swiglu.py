"""Fused SwiGLU, ``silu(gate) * up``: fwd+bwd time and peak memory against PyTorch eager, torch.compile and
Liger-Kernel's SiLU-mul, at the MLP shapes of Llama-3.2-1B (intermediate 8192) and Llama-3-8B (14336), bf16.

Each row also gives the bandwidth floor: the fused forward reads g and u and writes h, the backward reads dh, g and
u and writes dg and du, 8 passes over [tokens, intermediate] at the device's measured copy bandwidth.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import harness
import pytest
import torch
import torch.nn.functional as F

from lamelm_fast.ops.swiglu import swiglu

if torch.cuda.is_available():
    CASES = [(tokens, width) for width in (8192, 14_336) for tokens in (8192, 16_384)]
    DTYPE = torch.bfloat16
else:  # the CPU run keeps the suite alive: small shapes, torch reference path
    CASES = [(256, 384)]
    DTYPE = torch.float32
PASSES = 8


def eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # what transformers' LlamaMLP runs




def candidates() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    found = {"lamelm": swiglu, "eager": eager}
    if torch.cuda.is_available():  # (candidates() is called once per case; on CPU compiling would only cost time)
        found["torch_compile"] = harness.compiled_for_one_case(eager)
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        found["liger"] = LigerSiLUMulFunction.apply
    return found


@pytest.mark.parametrize(("tokens", "width"), CASES)
def test_swiglu(benchmark, device: torch.device, peaks: dict[str, float], tokens: int, width: int) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    pristine = [torch.randn(tokens, width, device=device, generator=gen).to(DTYPE) for _ in range(3)]
    gate, up = (t.clone().requires_grad_() for t in pristine[:2])
    grad = pristine[2]

    def reset() -> None:
        # Liger's backward writes its gradients over its saved inputs: every run starts from the same values.
        with torch.no_grad():
            gate.copy_(pristine[0])
            up.copy_(pristine[1])
        gate.grad = up.grad = None

    def step(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return lambda: fn(gate, up).backward(grad)

    row: dict[str, object] = {"tokens": tokens, "width": width, "dtype": str(DTYPE)}
    floor_ms = PASSES * tokens * width * pristine[0].element_size() / peaks["copy_bytes_per_second"] * 1e3
    harness.measure_against(row, {name: step(fn) for name, fn in candidates().items()}, device,
                            floor=("bandwidth_floor", floor_ms), warmup=3, repeats=30 if device.type == "cuda" else 5,
                            setup=reset)
    harness.record("swiglu", row)
    benchmark.extra_info.update(row)

    def ours_once() -> None:
        reset()
        swiglu(gate, up).backward(grad)

    benchmark.pedantic(harness.synchronized(ours_once, device), rounds=5, iterations=1, warmup_rounds=1)
