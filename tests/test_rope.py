"""The fused rotary position embedding: kernel and torch path against transformers' eager formula and a float64
reference (HF's transposed q/k layout, odd shapes, mixed dtypes, empty inputs, fallbacks), and the attention patch
on whole models (Llama, Qwen3, Gemma3; gradient checkpointing; PEFT; other models of the process left alone)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

from conftest import (
    assert_same_training,
    count_calls,
    lora_with_random_b,
    model_loss_and_grads,
    rel_err,
    tiny_model,
)
from lamelm_fast.ops.dispatch import triton_interpreted, use_backend
from lamelm_fast.ops.rope import (
    RotaryEmbeddingAttention,
    eager_rotary_embedding,
    patch_rope,
    rotary_embedding,
)

BACKENDS = ["torch", "triton"]


@pytest.fixture
def rope_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of the RoPE kernel's launch functions."""
    from lamelm_fast.kernels import rope

    return count_calls(monkeypatch, rope, {"forward": "rope_forward", "backward": "rope_backward"})


def memory_layout(t: torch.Tensor) -> list[int]:
    """The strides that matter: those of dimensions longer than 1."""
    return [stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1]


def inputs(batch: int, heads: int, kv_heads: int, seq: int, dim: int, dtype: torch.dtype, cos_dtype: torch.dtype,
           seed: int, *, layout: str = "hf", cos_batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """q, k as HF hands them over (``layout="hf"``: transposed views of [B, S, heads, d]) or contiguous [B, heads, S,
    d]; cos and sin [B (or cos_batch), S, d], generic values (the halves differ, unlike HF's tables)."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "hf":
        q = torch.randn(batch, seq, heads, dim, generator=generator).transpose(1, 2)
        k = torch.randn(batch, seq, kv_heads, dim, generator=generator).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, seq, dim, generator=generator)
        k = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    cos_batch = batch if cos_batch is None else cos_batch
    cos = torch.randn(cos_batch, seq, dim, generator=generator).to(cos_dtype)
    sin = torch.randn(cos_batch, seq, dim, generator=generator).to(cos_dtype)
    return q.to(dtype), k.to(dtype), cos, sin


def run(fn, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seed: int = 99,
        **kwargs) -> tuple[torch.Tensor, ...]:
    """(q_embed, k_embed, dq, dk) of ``fn`` for fixed output gradients."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_embed, k_embed = fn(q, k, cos, sin, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    grad_q = torch.randn(q_embed.shape, generator=generator).to(q_embed.device, q_embed.dtype)
    grad_k = torch.randn(k_embed.shape, generator=generator).to(k_embed.device, k_embed.dtype)
    torch.autograd.backward((q_embed, k_embed), (grad_q, grad_k))
    return q_embed.detach(), k_embed.detach(), q.grad, k.grad


def ours(backend: str):
    def fn(*args, **kwargs):
        with use_backend(backend):
            return rotary_embedding(*args, **kwargs)
    return fn


def float64_reference(q, k, cos, sin, **kwargs) -> tuple[torch.Tensor, ...]:
    return run(eager_rotary_embedding, q.double(), k.double(), cos.double(), sin.double(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dim", "layout", "cos_batch"), [(64, "hf", None), (80, "hf", None), (80, "contiguous", 1)])
def test_fp32_matches_float64(backend: str, dim: int, layout: str, cos_batch: int | None,
                              rope_launches: dict[str, int]) -> None:
    q, k, cos, sin = inputs(2, 3, 1, 37, dim, torch.float32, torch.float32, seed=dim, layout=layout,
                            cos_batch=cos_batch)
    actual = run(ours(backend), q, k, cos, sin)
    expected = run(eager_rotary_embedding, q, k, cos, sin)
    for a, e, precise in zip(actual, expected, float64_reference(q, k, cos, sin), strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert memory_layout(a) == memory_layout(e)  # the eager ops' memory layout (HF's: [B, S, heads, d] in memory)
        assert rel_err(a, precise) < 1e-6
        assert torch.equal(a, e)  # products rounded before the sum, as eager: the same numbers on CPU
    assert rope_launches == ({"forward": 1, "backward": 1} if backend == "triton" else {"forward": 0, "backward": 0})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "cos_dtype"), [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_16bit_equals_eager_ops(backend: str, dtype: torch.dtype, cos_dtype: torch.dtype) -> None:
    """Result dtype from torch's promotion (bf16 q, fp32 cos: fp32), gradients in q's dtype, and the eager ops'
    roundings: the same values, bit for bit."""
    q, k, cos, sin = inputs(2, 3, 1, 37, 80, dtype, cos_dtype, seed=5)
    out_dtype = torch.promote_types(dtype, cos_dtype)
    actual = run(ours(backend), q, k, cos, sin)
    expected = run(eager_rotary_embedding, q, k, cos, sin)
    for i, (a, e, precise) in enumerate(zip(actual, expected, float64_reference(q, k, cos, sin), strict=True)):
        assert a.dtype == (out_dtype if i < 2 else dtype) == e.dtype
        assert rel_err(a, precise) < (1e-6 if a.dtype == torch.float32 else 1e-2)
        if backend == "triton" and triton_interpreted() and torch.bfloat16 in (dtype, cos_dtype):
            continue  # the interpreter converts fp32 to bf16 by truncation, not to nearest; the GPU test covers it
        assert torch.equal(a, e), f"{(a != e).float().mean().item():.2%} of values differ from eager"


@pytest.mark.parametrize(("dtype", "autocast"), [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                                 (torch.float32, torch.bfloat16)])
def test_under_autocast_the_kernel_writes_what_attentions_cast_would(dtype: torch.dtype,
                                                                      autocast: torch.dtype) -> None:
    """QLoRA (fp32 q and k, fp32 tables) and a 16-bit full fine-tune (16-bit q, fp32 tables) under autocast: the
    kernel writes its result in autocast's dtype, as the attention's own cast of eager's wider result would (values,
    to the bit where the interpreter rounds to nearest), and the input gradients are eager's through that cast."""
    q, k, cos, sin = inputs(2, 3, 1, 37, 64, dtype, torch.float32, seed=7)

    def eager_then_cast(*args):
        return tuple(t.to(autocast) for t in eager_rotary_embedding(*args))

    with torch.autocast("cpu", dtype=autocast):
        actual = run(ours("triton"), q, k, cos, sin)
        expected = run(eager_then_cast, q, k, cos, sin)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype == (autocast if i < 2 else dtype)
        if autocast == torch.bfloat16 and triton_interpreted():
            assert rel_err(a, e) < 1e-2  # the interpreter truncates to bf16; the GPU test compares bits
        else:
            assert torch.equal(a, e), f"{i}: {(a != e).float().mean().item():.2%} of values differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_input_needs_a_gradient_and_empty_inputs(backend: str, rope_launches: dict[str, int]) -> None:
    q, k, cos, sin = inputs(2, 4, 2, 9, 64, torch.float32, torch.float32, seed=6)
    _, _, dq, dk = float64_reference(q, k, cos, sin)
    for needs_q in (True, False):
        q_in, k_in = q.clone().requires_grad_(needs_q), k.clone().requires_grad_(not needs_q)
        with use_backend(backend):
            q_embed, k_embed = rotary_embedding(q_in, k_in, cos, sin)
        generator = torch.Generator().manual_seed(99)  # run()'s output gradients
        grads = [torch.randn(t.shape, generator=generator) for t in (q_embed, k_embed)]
        pairs = [(t, g) for t, g in zip((q_embed, k_embed), grads, strict=True) if t.requires_grad]
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        leaf, reference = (q_in, dq) if needs_q else (k_in, dk)
        assert rel_err(leaf.grad, reference) < 1e-6
        assert (k_in if needs_q else q_in).grad is None
    for batch, seq in ((2, 0), (0, 5)):
        q, k, cos, sin = inputs(batch, 3, 1, seq, 64, torch.float32, torch.float32, seed=7)
        q_embed, k_embed, dq, dk = run(ours(backend), q, k, cos, sin)
        assert q_embed.shape == dq.shape == (batch, 3, seq, 64) and k_embed.shape == dk.shape == (batch, 1, seq, 64)
    # the launch functions are called for the empty inputs too (and return at once)
    assert rope_launches == ({"forward": 4, "backward": 4} if backend == "triton" else {"forward": 0, "backward": 0})


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_layouts_fall_back_to_the_eager_formula(backend: str, rope_launches: dict[str, int]) -> None:
    # unsqueeze_dim=2: q and k as [B, S, heads, d]
    q, k, cos, sin = inputs(2, 3, 1, 11, 64, torch.float32, torch.float32, seed=8)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    actual = run(ours(backend), q, k, cos, sin, unsqueeze_dim=2)
    for a, e in zip(actual, float64_reference(q, k, cos, sin, unsqueeze_dim=2), strict=True):
        assert rel_err(a, e) < 1e-6
    # cos and sin that need a gradient get one
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    with use_backend(backend):
        q_embed, k_embed = rotary_embedding(q, k, cos, sin)
    (q_embed.sum() + k_embed.square().sum()).backward()
    cos64, sin64 = cos.detach().double().requires_grad_(), sin.detach().double().requires_grad_()
    q64, k64 = eager_rotary_embedding(q.double(), k.double(), cos64, sin64)
    (q64.sum() + k64.square().sum()).backward()
    assert rel_err(cos.grad, cos64.grad) < 1e-6 and rel_err(sin.grad, sin64.grad) < 1e-6
    assert rope_launches == {"forward": 0, "backward": 0}


# --- the attention patch on whole models -----------------------------------------------------------------------

def modeling_module(model: nn.Module) -> types.ModuleType:
    attention = next(m for m in model.modules() if isinstance(m, RotaryEmbeddingAttention))
    return sys.modules[type(attention).__mro__[2].__module__]  # (Rope<Family>Attention, mixin, <Family>Attention)


@pytest.mark.parametrize(("family", "backend", "checkpointing"), [
    ("llama", "torch", False), ("llama", "triton", False), ("llama", "triton", True), ("qwen3", "torch", True),
    ("qwen3", "triton", False), ("qwen3", "triton", True), ("gemma3", "triton", False)])
def test_patched_model_equals_unpatched(family: str, backend: str, checkpointing: bool,
                                        rope_launches: dict[str, int]) -> None:
    reference = tiny_model(family)
    model = copy.deepcopy(reference)
    assert patch_rope(model) == 2 and patch_rope(model) == 2  # idempotent
    attention = model.model.layers[0].self_attn
    assert type(attention).__name__ == f"Rope{type(reference.model.layers[0].self_attn).__name__}"
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[n]) for n, v in model.state_dict().items())
    wrapper = modeling_module(model).apply_rotary_pos_emb
    assert wrapper._lamelm_original is wrapper.__wrapped__ and not hasattr(wrapper.__wrapped__, "_lamelm_original")
    for m in (model, reference):
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(1, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with use_backend(backend):
        ref_loss, ref_grads = model_loss_and_grads(reference, ids)  # the original function: no kernel
        assert rope_launches == {"forward": 0, "backward": 0}
        loss, grads = model_loss_and_grads(model, ids)
    if backend == "triton":  # each layer once forward, again in the recompute, and once backward
        assert rope_launches == {"forward": 2 * (2 if checkpointing else 1), "backward": 2}
    assert len(grads) == len(list(model.parameters()))
    assert_same_training((loss, grads), (ref_loss, ref_grads), exact=backend == "torch")  # torch: the eager ops


def test_patched_peft_lora_model(rope_launches: dict[str, int]) -> None:
    pytest.importorskip("peft")

    torch.manual_seed(0)
    reference = lora_with_random_b(tiny_model("llama"), ["q_proj", "k_proj", "v_proj"])
    model = copy.deepcopy(reference)
    assert patch_rope(model) == 2
    ids = torch.randint(1, 97, (2, 15), generator=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        loss, grads = model_loss_and_grads(model, ids)
    ref_loss, ref_grads = model_loss_and_grads(reference, ids)
    assert rope_launches == {"forward": 2, "backward": 2}
    assert len(grads) == 12
    assert_same_training((loss, grads), (ref_loss, ref_grads), exact=False)


def test_patch_leaves_other_attention_and_other_functions_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention classes not listed get nothing; a listed class name whose module's apply_rotary_pos_emb computes
    something else (another RoPE convention) is not patched, and its function is not replaced."""
    fake = types.ModuleType("fake_modeling")

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # interleaved pairs (GPT-J style): not HF Llama's
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    class LlamaAttention(nn.Module):
        pass

    LlamaAttention.__module__ = fake.__name__
    fake.apply_rotary_pos_emb = apply_rotary_pos_emb
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    model = nn.Sequential(LlamaAttention(), nn.MultiheadAttention(8, 2))
    assert patch_rope(model) == 0
    assert fake.apply_rotary_pos_emb is apply_rotary_pos_emb
    assert not any(isinstance(m, RotaryEmbeddingAttention) for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "cos_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
def test_cuda_real_shape_equals_eager(dtype: torch.dtype, cos_dtype: torch.dtype) -> None:
    """Llama-3.2-1B attention at batch 4 x 2048: the eager ops' values (bf16: round to nearest, as they do)."""
    q, k, cos, sin = (t.cuda() for t in inputs(4, 32, 8, 2048, 64, dtype, cos_dtype, seed=9))
    actual = run(ours("triton"), q, k, cos, sin)
    expected = run(eager_rotary_embedding, q, k, cos, sin)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and memory_layout(a) == memory_layout(e)
        assert rel_err(a, e) < (1e-6 if a.dtype == torch.float32 else 1e-2)
        assert (a != e).float().mean().item() < 0.001


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_under_bf16_autocast_writes_bf16_equal_to_the_cast_of_eager(dtype: torch.dtype) -> None:
    q, k, cos, sin = (t.cuda() for t in inputs(4, 32, 8, 2048, 64, dtype, torch.float32, seed=10))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        actual = run(ours("triton"), q, k, cos, sin)
        expected = run(lambda *args: tuple(t.to(torch.bfloat16) for t in eager_rotary_embedding(*args)), q, k, cos,
                       sin)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_past_int32_offsets() -> None:
    """q of more than 2^31 elements (one sequence of 1M + 64 tokens, 32 heads of 64): the last tokens are right."""
    seq = 2**20 + 64
    q = torch.ones(1, seq, 32, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = torch.randn(1, 1, seq, 64, dtype=torch.bfloat16, device="cuda")
    positions = torch.arange(seq, device="cuda", dtype=torch.float32)[None, :, None]
    freqs = positions * torch.linspace(1e-4, 1, 32, device="cuda").repeat(2)
    cos, sin = freqs.cos(), freqs.sin()
    q[:, :, -3:] = torch.randn(1, 32, 3, 64, dtype=torch.bfloat16, device="cuda")
    with use_backend("triton"), torch.no_grad():
        q_embed, k_embed = rotary_embedding(q, k, cos, sin)
    expected_q, expected_k = eager_rotary_embedding(q[:, :, -3:], k[:, :, -3:], cos[:, -3:], sin[:, -3:])
    assert torch.equal(q_embed[:, :, -3:], expected_q) and torch.equal(k_embed[:, :, -3:], expected_k)
