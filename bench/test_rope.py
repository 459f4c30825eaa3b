"""Fused rotary position embedding: fwd+bwd time and peak memory against transformers' eager
``apply_rotary_pos_emb``, torch.compile of it and Liger-Kernel's ``LigerRopeFunction``, at the attention shapes of
Llama-3.2-1B (32 heads, 8 kv heads, d = 64) and Llama-3-8B (32 / 8, d = 128), batch 4 and 8 x 2048 tokens; q and k
fp32 with fp32 cos and sin (QLoRA: PEFT makes the hidden states fp32), and bf16 with bf16 cos and sin.

Each row also gives the bandwidth floor: the fused forward reads q, k, cos and sin and writes q_embed and k_embed,
the backward reads their gradients, cos and sin and writes dq and dk: 4 passes over q and k, and 4 over one [B, S,
d] table, at the device's measured copy bandwidth.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import harness
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lamelm_fast.ops.rope import rotary_embedding

if torch.cuda.is_available():
    CASES = [(batch, 2048, 32, 8, dim, dtype) for dim in (64, 128) for batch in (4, 8)
             for dtype in (torch.float32, torch.bfloat16)]
else:  # the CPU run keeps the suite alive: a small shape, torch reference path
    CASES = [(2, 64, 4, 2, 64, torch.float32)]
PASSES = 4  # over q and k (and over one cos/sin-sized table)

Rope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def eager(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary_pos_emb(q, k, cos, sin)  # what transformers' LlamaAttention runs




def candidates() -> dict[str, Rope]:
    found: dict[str, Rope] = {"lamelm": rotary_embedding, "eager": eager}
    if torch.cuda.is_available():  # (candidates() is called once per case; on CPU compiling would only cost time)
        found["torch_compile"] = harness.compiled_for_one_case(eager)
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.rope import LigerRopeFunction

        # (q, k) in older releases, (q, k, cos, sin) in newer ones; it reads only the first half of cos and sin
        # (HF's tables repeat it), and writes over q and k (and over the output gradients backward).
        found["liger"] = lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)[:2]
    return found


def rope_tables(batch: int, seq: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama's cos and sin for positions 0..seq-1 (theta 500000), [B, S, d] fp32."""
    inv_freq = 1.0 / (500_000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).expand(batch, seq, dim)
    return emb.cos().contiguous(), emb.sin().contiguous()


@pytest.mark.parametrize(("batch", "seq", "heads", "kv_heads", "dim", "dtype"), CASES)
def test_rope(benchmark, device: torch.device, peaks: dict[str, float], batch: int, seq: int, heads: int,
              kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator(device=device).manual_seed(0)

    def hf_layout(n_heads: int) -> torch.Tensor:  # a transposed view of the projection output, as HF hands it over
        return torch.randn(batch, seq, n_heads, dim, device=device, generator=gen).to(dtype).transpose(1, 2)

    pristine = [hf_layout(heads), hf_layout(kv_heads), hf_layout(heads), hf_layout(kv_heads)]
    q, k = (t.clone().requires_grad_() for t in pristine[:2])  # clone keeps the transposed strides
    grad_q, grad_k = (t.clone() for t in pristine[2:])
    cos, sin = (t.to(dtype) for t in rope_tables(batch, seq, dim, device))

    def reset() -> None:
        # Liger writes over its inputs forward and over the output gradients backward: every run starts the same.
        with torch.no_grad():
            for tensor, source in zip((q, k, grad_q, grad_k), pristine, strict=True):
                tensor.copy_(source)
        q.grad = k.grad = None

    def step(fn: Rope) -> Callable[[], None]:
        return lambda: torch.autograd.backward(fn(q, k, cos, sin), (grad_q, grad_k))

    row: dict[str, object] = {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                              "dtype": str(dtype), "cos_dtype": str(cos.dtype)}
    moved = PASSES * batch * seq * dim * ((heads + kv_heads) * q.element_size() + cos.element_size())
    floor_ms = moved / peaks["copy_bytes_per_second"] * 1e3
    harness.measure_against(row, {name: step(fn) for name, fn in candidates().items()}, device,
                            floor=("bandwidth_floor", floor_ms), warmup=3, repeats=30 if device.type == "cuda" else 5,
                            setup=reset)
    harness.record("rope", row)
    benchmark.extra_info.update(row)

    def ours_once() -> None:
        reset()
        torch.autograd.backward(rotary_embedding(q, k, cos, sin), (grad_q, grad_k))

    benchmark.pedantic(harness.synchronized(ours_once, device), rounds=5, iterations=1, warmup_rounds=1)
