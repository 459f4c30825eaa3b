"""The fused SwiGLU (``silu(gate) * up``): kernel and torch reference against PyTorch's eager ops and a float64
reference, and the MLP patch on whole models (plain, PEFT LoRA, and together with the 4-bit LoRA patch)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_training, lora_with_random_b, model_loss_and_grads, rel_err, tiny_llama_config
from lamelm_fast.ops.dispatch import triton_interpreted, use_backend
from lamelm_fast.ops.swiglu import SwiGLUMLP, patch_swiglu, swiglu, swiglu_gradients

BACKENDS = ["torch", "triton"]


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gate, up, grad = (torch.randn(shape, generator=generator) * 3 for _ in range(3))
    return gate.to(dtype), up.to(dtype), grad.to(dtype)


def eager(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PyTorch's own ops with autograd, as a Llama MLP runs them."""
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = F.silu(gate) * up
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


def run(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...]:
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    with use_backend(backend):
        out = swiglu(gate, up)
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 37), (4099,), (2, 4096 + 77)])
def test_fp32_matches_float64(backend: str, shape: tuple[int, ...]) -> None:
    gate, up, grad = inputs(shape, torch.float32, seed=sum(shape))
    expected = eager(gate.double(), up.double(), grad.double())
    for actual, reference in zip(run(gate, up, grad, backend), expected, strict=True):
        assert actual.dtype == torch.float32
        assert rel_err(actual, reference) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_equals_eager_ops(backend: str, dtype: torch.dtype) -> None:
    """Same roundings as PyTorch's eager ops: the values of the model's own MLP, to the last bit but for exp's own
    last-bit differences (which can move a rounding; never by more than one unit in the last place)."""
    gate, up, grad = inputs((7, 301), dtype, seed=3)
    expected = eager(gate, up, grad)
    exact = eager(gate.double(), up.double(), grad.double())
    for actual, reference, precise in zip(run(gate, up, grad, backend), expected, exact, strict=True):
        assert actual.dtype == dtype
        assert rel_err(actual, precise) < 1e-2
        if backend == "triton" and dtype == torch.bfloat16 and triton_interpreted():
            continue  # the interpreter converts fp32 to bf16 by truncation, not to nearest; the GPU test covers it
        mismatch = (actual != reference).float().mean().item()
        assert mismatch < 0.01, f"{mismatch:.2%} of values differ from eager"
        ulp = torch.finfo(dtype).eps * reference.double().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((actual.double() - reference.double()).abs() <= ulp + 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_written_over_the_output_gradient(backend: str) -> None:
    gate, up, grad = inputs((5, 999), torch.float32, seed=4)
    _, expected_gate, expected_up = eager(gate, up, grad)
    buffer = grad.clone()
    grad_gate, grad_up = swiglu_gradients(buffer, gate, up, backend, overwrite_grad=True)
    assert grad_gate.data_ptr() == buffer.data_ptr()
    assert rel_err(grad_gate, expected_gate) < 1e-6 and rel_err(grad_up, expected_up) < 1e-6
    untouched = grad.clone()
    swiglu_gradients(untouched, gate, up, backend)
    assert torch.equal(untouched, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty_inputs(backend: str) -> None:
    gate, up, grad = inputs((37, 2, 45), torch.float32, seed=5)
    gate, up, grad = gate.transpose(0, 2), up[:, 1:2, :].transpose(0, 2).expand(45, 2, 37), grad.transpose(0, 2)
    expected = eager(gate, up.contiguous(), grad)
    actual = run(gate, up.contiguous(), grad, backend)
    for a, e in zip(actual, expected, strict=True):
        assert rel_err(a, e) < 1e-6
    out, grad_gate, grad_up = run(*inputs((0, 11), torch.float32, seed=6), backend)
    assert out.shape == grad_gate.shape == grad_up.shape == (0, 11)


def test_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="gate and up must match"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="gate and up must match"):
        swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_llama_equals_unpatched(backend: str) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(97, intermediate_size=83))
    model = copy.deepcopy(reference)
    assert patch_swiglu(model) == 2 and patch_swiglu(model) == 2  # idempotent
    assert type(model.model.layers[0].mlp).__name__ == "SwiGLULlamaMLP"
    assert model.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(1, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with use_backend(backend):
        loss, grads = model_loss_and_grads(model, ids)
    ref_loss, ref_grads = model_loss_and_grads(reference, ids)
    assert_same_training((loss, grads), (ref_loss, ref_grads), exact=backend == "torch")  # torch: the eager ops


def test_patch_leaves_other_activations_and_families_alone() -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(97, hidden_act="gelu"))
    assert patch_swiglu(model) == 0
    assert not any(isinstance(m, SwiGLUMLP) for m in model.modules())


def test_patched_peft_lora_model_trains_the_same() -> None:
    pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = lora_with_random_b(LlamaForCausalLM(tiny_llama_config(97, intermediate_size=83)),
                                   ["gate_proj", "up_proj", "down_proj"])
    model = copy.deepcopy(reference)
    assert patch_swiglu(model) == 2
    ids = torch.randint(1, 97, (2, 15), generator=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        loss, grads = model_loss_and_grads(model, ids)
    ref_loss, ref_grads = model_loss_and_grads(reference, ids)
    assert len(grads) == 12
    assert_same_training((loss, grads), (ref_loss, ref_grads), exact=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_large_equals_eager_past_int32_offsets() -> None:
    """bf16 at a real MLP shape equals the eager ops, and an element count past 2^31 is indexed correctly."""
    gate, up, grad = (t.cuda() for t in inputs((8192, 8192), torch.bfloat16, seed=7))
    for actual, reference in zip(run(gate, up, grad, "triton"), eager(gate, up, grad), strict=True):
        assert (actual != reference).float().mean().item() < 0.001  # round to nearest, as the eager ops
        assert rel_err(actual, reference) < 1e-2
    del gate, up, grad
    n = 2**31 + 4097
    gate = torch.full((n,), 1.5, dtype=torch.bfloat16, device="cuda")
    up = torch.full((n,), -2.0, dtype=torch.bfloat16, device="cuda")
    gate[-3:] = torch.tensor([0.5, -1.0, 4.0], dtype=torch.bfloat16)
    with use_backend("triton"):
        out = swiglu(gate, up)
    assert torch.equal(out[-3:], F.silu(gate[-3:]) * up[-3:])
    assert torch.equal(out[:5], F.silu(gate[:5]) * up[:5])
