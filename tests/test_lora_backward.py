"""The one-pass kernel for a LoRA projection's adapter products from the output gradient (``gb = g @ B`` and
``g^T @ xa``, ``g`` the gradient in the adapter dtype), against float64, and inside the 4-bit LoRA op against PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from lamelm_fast.kernels import lora_backward  # noqa: E402

F32, F16 = torch.float32, torch.float16


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def reference(grad: torch.Tensor, B: torch.Tensor, xa: torch.Tensor,
              lora_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 products of the operands as the kernel must round them: grad and B to the adapter dtype."""
    g = grad.to(lora_dtype).double()
    return g @ B.to(lora_dtype).double(), g.t() @ xa.to(lora_dtype).double()


def check(grad: torch.Tensor, B: torch.Tensor, xa: torch.Tensor, lora_dtype: torch.dtype, **grid: int) -> None:
    scale = 1.7  # LoRA's alpha / r, applied to db by the kernel
    gb, db = lora_backward.lora_output_grad(grad, B, xa, lora_dtype=lora_dtype, scale=scale, **grid)
    want_gb, want_db = reference(grad, B, xa, lora_dtype)
    want_db *= scale
    assert gb.shape == want_gb.shape and gb.dtype == lora_dtype
    assert db.shape == want_db.shape and db.dtype == torch.float32
    # fp32 accumulation of exactly rounded operands: fp32-level error. A gradient not rounded to fp16 first would
    # be off by ~1e-4 in db; gb is rounded once to the adapter dtype (fp16: ~3e-4 relative at worst per entry).
    assert rel_err(db, want_db) < 2e-6
    assert rel_err(gb, want_gb) < (2e-6 if lora_dtype == F32 else 5e-4)
    if lora_dtype != F32:  # within one rounding of the exact value, entry by entry
        assert torch.allclose(gb.double(), want_gb, rtol=2 ** -10, atol=1e-3)


# (M, out, r): odd row and column counts (masked tails), ranks padded to 16 (8) and not (16, 32).
SHAPES = [(37, 48, 16), (130, 200, 8), (37, 513, 32), (130, 513, 16), (130, 48, 32)]


@pytest.mark.parametrize("grad_dtype", [F32, F16])
@pytest.mark.parametrize("lora_dtype", [F32, F16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-out{}-r{}".format(*s))
def test_kernel_equals_float64(shape: tuple[int, int, int], lora_dtype: torch.dtype,
                               grad_dtype: torch.dtype) -> None:
    M, N, r = shape
    generator = torch.Generator().manual_seed(M * N + r)
    grad = torch.randn(M, N, generator=generator).to(grad_dtype)
    B = torch.randn(N, r, generator=generator)  # fp32, as PEFT keeps it; cast in the kernel
    xa = torch.randn(M, r, generator=generator).to(lora_dtype)
    check(grad, B, xa, lora_dtype)


@pytest.mark.parametrize(("programs", "groups"), [(1, 1), (3, 1), (2, 4), (5, 2)])
def test_every_split_of_the_grid_sums_the_same(programs: int, groups: int) -> None:
    """One or several row programs (each its own dB partial, its first row block writing it unread), one column
    group (gb stored in the adapter dtype) or several (fp32 gb partials)."""
    generator = torch.Generator().manual_seed(11)
    grad = torch.randn(130, 200, generator=generator)
    B, xa = torch.randn(200, 16, generator=generator), torch.randn(130, 16, generator=generator).half()
    check(grad, B, xa, F16, programs=programs, groups=groups)


def test_strided_operands() -> None:
    """grad as a column slice of a wider buffer (row stride != out), B and xa transposed views."""
    generator = torch.Generator().manual_seed(12)
    M, N, r = 37, 200, 16
    grad = torch.randn(M, N + 9, generator=generator)[:, 5:5 + N]
    B = torch.randn(r, N, generator=generator).t()
    xa = torch.randn(r, M, generator=generator).t()
    assert grad.stride() == (N + 9, 1) and not B.is_contiguous() and not xa.is_contiguous()
    check(grad, B, xa, F32)


def test_no_rows_and_bad_operands() -> None:
    gb, db = lora_backward.lora_output_grad(torch.empty(0, 48), torch.randn(48, 16), torch.empty(0, 16),
                                            lora_dtype=F16)
    assert gb.shape == (0, 16) and gb.dtype == F16
    assert db.shape == (48, 16) and db.dtype == F32 and not db.any()
    with pytest.raises(ValueError, match="unit column stride"):
        lora_backward.lora_output_grad(torch.randn(48, 8).t(), torch.randn(48, 16), torch.randn(8, 16),
                                       lora_dtype=F32)
    with pytest.raises(ValueError, match="do not fit"):
        lora_backward.lora_output_grad(torch.randn(8, 48), torch.randn(40, 16), torch.randn(8, 16), lora_dtype=F32)
    big = lora_backward.MAX_RANK + 1
    with pytest.raises(ValueError, match="rank"):
        lora_backward.lora_output_grad(torch.randn(8, 48), torch.randn(48, big), torch.randn(8, big),
                                       lora_dtype=F32)


# --------------------------------------------------------------------------------------------------- in the op

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from test_lora4bit import _Holder, peft_layer, run  # noqa: E402
from test_lora4bit_model import loss_and_grads, qlora_model, quantized_dir  # noqa: E402, F401  (fixture)
from test_nf4_dequant import eager_bitsandbytes  # noqa: E402, F401  (autouse fixture)

from lamelm_fast.ops import lora_nf4_linear  # noqa: E402
from lamelm_fast.ops.dispatch import use_backend  # noqa: E402
from lamelm_fast.ops.lora4bit import patch_peft_lora4bit  # noqa: E402


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], int]]:
    """The [M, out] shape and column stride of the gradient at each call of the fused kernel's launch function."""
    calls: list[tuple[tuple[int, ...], int]] = []
    launch = lora_backward.lora_output_grad

    def counted(grad: torch.Tensor, *args, **kwargs):
        calls.append((tuple(grad.shape), grad.stride(1)))
        return launch(grad, *args, **kwargs)

    monkeypatch.setattr(lora_backward, "lora_output_grad", counted)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_patched_layer_runs_the_kernel_and_equals_peft(dropout: float, kernel_calls: list) -> None:
    ref_layer = peft_layer(64, 40, dropout=dropout)
    layer = copy.deepcopy(ref_layer)
    assert patch_peft_lora4bit(_Holder(layer)) == 1
    torch.manual_seed(3)
    x, grad_out = torch.randn(3, 11, 64), torch.randn(3, 11, 40)
    with use_backend("triton"):
        ours = run(layer, x, grad_out, seed=7)
    assert kernel_calls == [((33, 40), 1)]
    ref = run(ref_layer, x, grad_out, seed=7)
    for name in ref:
        assert rel_err(ours[name], ref[name]) < 1e-5, name
    with use_backend("torch"):  # the reference path never launches it
        run(layer, x, grad_out, seed=7)
    assert len(kernel_calls) == 1


def test_fp16_adapter_and_frozen_b(kernel_calls: list) -> None:
    """An fp16 adapter on fp32 activations (the gradient is rounded to fp16 in the kernel): Triton equals the torch
    reference to fp16 rounding (dB is rounded once, not twice). With B frozen the kernel is not needed: torch runs."""
    layer = peft_layer(64, 48, bias=False, r=16)
    base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
    A0, B0 = a.weight.detach().half(), b.weight.detach().half()
    torch.manual_seed(5)
    x, grad_out = torch.randn(37, 64), torch.randn(48, 37).t()  # a column-strided gradient: made contiguous

    def grads(backend: str, train_b: bool = True) -> dict[str, torch.Tensor | None]:
        xx, A, B = (t.clone().requires_grad_(True) for t in (x, A0, B0))
        B.requires_grad_(train_b)
        with use_backend(backend):
            y = lora_nf4_linear(xx, base.weight, base.weight.quant_state, A, B, 1.5)
        y.backward(grad_out)
        return {"y": y.detach(), "x": xx.grad, "A": A.grad, "B": B.grad}

    ours, ref = grads("triton"), grads("torch")
    assert kernel_calls == [((37, 48), 1)]
    for name in ref:
        assert ours[name].dtype == ref[name].dtype
        assert rel_err(ours[name], ref[name]) < 2e-3, name
    frozen = grads("triton", train_b=False)
    assert len(kernel_calls) == 1 and frozen["B"] is None
    assert rel_err(frozen["A"], ref["A"]) < 2e-3


def test_patched_tiny_llama_runs_the_kernel_per_projection(quantized_dir: Path,  # noqa: F811  (the fixture)
                                                           kernel_calls: list) -> None:
    """Every projection of the fused q/k/v op, o_proj and the fused MLP takes its adapter products from the kernel;
    loss and every LoRA gradient still equal PEFT's."""
    ref_model = qlora_model(quantized_dir, dropout=0.1, checkpointing=False)
    model = copy.deepcopy(ref_model)
    patch_peft_lora4bit(model)
    ids = torch.randint(1, 96, (2, 13), generator=torch.Generator().manual_seed(9))
    with use_backend("triton"):
        loss, grads, _ = loss_and_grads(model, ids)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert len(kernel_calls) == 7 * layers
    shapes = {shape for shape, _ in kernel_calls}
    assert {(26, model.config.intermediate_size), (26, hidden)} <= shapes
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
