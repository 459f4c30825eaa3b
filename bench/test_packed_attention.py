"""Attention over a packed row: varlen flash attention (what our sdpa wrapper runs when a batch carries
transformers' padding-free arguments) against transformers' sdpa over the block-diagonal causal mask it builds for
packed position ids, fwd+bwd, at Llama-3.2-1B's attention shape (32 query heads, 8 kv heads, d = 64), bf16, rows of
8k and 16k tokens packed from sequences averaging 256 and 1024 tokens.

The floor is the causal attention FLOPs of the sequences themselves: 2 * heads * d * sum(L_i^2) forward (two
matmuls over half of each sequence's square) and 2.5x that backward, at the device's measured bf16 matmul rate.
NOTES-end-to-end.md ("Packed batches") predicts the ratios. On CPU the wrapper has no flash kernel and runs sdpa:
the row only proves that the bench runs.
"""

from __future__ import annotations

import harness
import pytest
import torch
from torch import nn

from lamelm_fast.ops.varlen_attention import patch_varlen_attention

if torch.cuda.is_available():
    CASES = [(tokens, mean) for tokens in (8192, 16384) for mean in (256, 1024)]
    HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 64, torch.bfloat16
else:
    CASES = [(256, 64)]
    HEADS, KV_HEADS, HEAD_DIM, DTYPE = 4, 2, 16, torch.float32


class AttentionModule(nn.Module):
    """What transformers' attention functions read from the attention module."""

    is_causal = True
    num_key_value_groups = HEADS // KV_HEADS


def sequence_lengths(tokens: int, mean: int) -> list[int]:
    """Lengths uniform in [mean / 4, 7 mean / 4], the last one cut to fill the row exactly."""
    generator = torch.Generator().manual_seed(tokens + mean)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(mean // 4, 7 * mean // 4 + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - tokens
    return lengths


def block_causal_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """transformers' sdpa mask for one packed row: [1, 1, T, T] bool, True where a query may attend."""
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device))
    position = torch.arange(len(document), device=device)
    allowed = (document[:, None] == document[None, :]) & (position[None, :] <= position[:, None])
    return allowed[None, None]


@pytest.mark.parametrize(("tokens", "mean"), CASES)
def test_packed_attention(benchmark, device: torch.device, peaks: dict[str, float], tokens: int, mean: int) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patch_varlen_attention()
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    sdpa = wrapped.lamelm_varlen_wrapped
    lengths = sequence_lengths(tokens, mean)
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    padding_free = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max(lengths),
                    "max_length_k": max(lengths)}
    mask = block_causal_mask(lengths, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def hf_layout(heads: int) -> torch.Tensor:  # [1, heads, T, d] views of [1, T, heads, d] projections
        return torch.randn(1, tokens, heads, HEAD_DIM, device=device, generator=gen, dtype=DTYPE).transpose(1, 2)

    q, k, v = (hf_layout(h).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS))
    grad = torch.randn(1, tokens, HEADS, HEAD_DIM, device=device, generator=gen, dtype=DTYPE)
    module = AttentionModule()

    def step(attention, mask_or_none, kwargs):
        def run() -> None:
            out, _ = attention(module, q, k, v, mask_or_none, dropout=0.0, scaling=HEAD_DIM**-0.5, **kwargs)
            out.backward(grad)
        return run

    def reset() -> None:
        q.grad = k.grad = v.grad = None

    flops = 7.0 * HEADS * HEAD_DIM * sum(n * n for n in lengths)
    row: dict[str, object] = {"tokens": tokens, "mean_length": mean, "sequences": len(lengths), "heads": HEADS,
                              "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": str(DTYPE)}
    harness.measure_against(row, {"lamelm": step(wrapped, mask, padding_free), "sdpa_block_mask": step(sdpa, mask, {})},
                            device, floor=("roofline", flops / peaks["matmul_flops"] * 1e3), warmup=3,
                            repeats=20 if device.type == "cuda" else 3, setup=reset)
    harness.record("packed_attention", row)
    benchmark.extra_info.update(row)

    def ours_once() -> None:
        reset()
        step(wrapped, mask, padding_free)()

    benchmark.pedantic(harness.synchronized(ours_once, device), rounds=5, iterations=1, warmup_rounds=1)
