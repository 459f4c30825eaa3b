"""The fused 4-bit LoRA op and module against PEFT's LoRA over bitsandbytes' Linear4bit (forward and every gradient)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from test_nf4_dequant import eager_bitsandbytes  # noqa: E402, F401  (autouse fixture)

from lamelm_fast.ops import LoRALinear4bit, lora_nf4_linear  # noqa: E402
from lamelm_fast.ops.dispatch import use_backend, use_nf4_matmul  # noqa: E402
from lamelm_fast.ops.lora4bit import patch_peft_lora4bit, reuse_adapter_casts  # noqa: E402

TOL = 1e-5  # fp32 compute on CPU


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


class _Holder(nn.Module):
    is_loaded_in_4bit = True  # what PEFT reads to give a Linear4bit its bitsandbytes LoRA class, as in HF models

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def peft_layer(in_features: int, out_features: int, *, bias: bool = True, quant_type: str = "nf4",
               nested: bool = True, blocksize: int = 64, r: int = 5, dropout: float = 0.0,
               seed: int = 0) -> nn.Module:
    """PEFT's LoRA layer over a bitsandbytes Linear4bit with random (non-zero) A and B, every tensor trainable."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    base = LoRALinear4bit.from_linear(dense, 1, quant_type=quant_type, compress_statistics=nested,
                                      blocksize=blocksize).base_layer
    config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, lora_dropout=dropout, target_modules=["proj"])
    layer = peft.inject_adapter_in_model(config, _Holder(base)).proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    if bias:
        base.bias.requires_grad_(True)
    return layer


def run(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """Output and gradients of x, A, B and bias (each call draws dropout from the same seed)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(grad_out)
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    a = layer.lora_A["default"] if isinstance(layer.lora_A, nn.ModuleDict) else layer.lora_A
    b = layer.lora_B["default"] if isinstance(layer.lora_B, nn.ModuleDict) else layer.lora_B
    result = {"y": y.detach(), "x": x.grad, "A": a.weight.grad, "B": b.weight.grad}
    if base.bias is not None and base.bias.requires_grad:
        result["bias"] = base.bias.grad
    return result


def assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = TOL) -> None:
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] is not None, name
        assert rel_err(ours[name], ref[name]) < tol, (name, rel_err(ours[name], ref[name]))


# (in, out, blocksize, quant_type, nested, bias, leading shape of x): odd sizes, tail blocks, blocks straddling
# rows with odd in_features, row counts on both sides of the GEMV threshold. (Not even in_features with blocks
# straddling rows: bitsandbytes' AVX-512 CPU kernel gets those wrong, see test_nf4_dequant.py.)
CASES = [
    (64, 48, 64, "nf4", True, True, (2, 9)),
    (35, 29, 32, "fp4", False, False, (19,)),
    (128, 40, 128, "nf4", False, True, (1, 3)),
    (64, 33, 32, "fp4", True, True, (2,)),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[3]}-bs{c[2]}-M{c[6]}")
def test_patched_layer_equals_peft(case: tuple, backend: str, launches: dict[str, int]) -> None:
    in_f, out_f, blocksize, quant_type, nested, bias, lead = case
    ref_layer = peft_layer(in_f, out_f, bias=bias, quant_type=quant_type, nested=nested, blocksize=blocksize)
    layer = copy.deepcopy(ref_layer)
    assert patch_peft_lora4bit(_Holder(layer)) == 1
    torch.manual_seed(2)
    x = torch.randn(*lead, in_f)
    grad_out = torch.randn(*lead, out_f)
    with use_backend(backend):
        ours = run(layer, x, grad_out)
    # Triton: the forward and the input gradient, with the fused kernel (auto does not time off a GPU).
    assert launches == {"fused": 2 if backend == "triton" else 0, "dequant": 0}
    assert_same(ours, run(ref_layer, x, grad_out))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_draws_peft_masks_and_differentiates_through_them(backend: str) -> None:
    ref_layer = peft_layer(64, 40, dropout=0.3)
    layer = copy.deepcopy(ref_layer)
    patch_peft_lora4bit(_Holder(layer))
    torch.manual_seed(3)
    x, grad_out = torch.randn(20, 64), torch.randn(20, 40)
    with use_backend(backend):
        ours = run(layer, x, grad_out, seed=7)
    ref = run(ref_layer, x, grad_out, seed=7)
    assert_same(ours, ref)
    # The mask matters: another sample gives other gradients, and eval mode none at all.
    with use_backend(backend):
        assert rel_err(run(layer, x, grad_out, seed=8)["A"], ref["A"]) > 1e-2
        layer.eval()
        ref_layer.eval()
        assert_same(run(layer, x, grad_out), run(ref_layer, x, grad_out))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_functional_op_on_strided_input(backend: str) -> None:
    layer = peft_layer(64, 24, quant_type="fp4", nested=True, blocksize=32)
    base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
    torch.manual_seed(4)
    x = torch.randn(64, 3, 7).permute(1, 2, 0).requires_grad_(True)  # [3, 7, 64], not contiguous
    grad_out = torch.randn(3, 7, 24)
    with use_backend(backend):
        y = lora_nf4_linear(x, base.weight, base.weight.quant_state, a.weight, b.weight, layer.scaling["default"],
                            bias=base.bias)
    y.backward(grad_out)
    ours = {"y": y.detach(), "x": x.grad, "A": a.weight.grad, "B": b.weight.grad, "bias": base.bias.grad}
    assert_same(ours, run(layer, x, grad_out))


def test_module_from_linear_equals_peft_and_trains_only_the_adapter() -> None:
    torch.manual_seed(5)
    dense = nn.Linear(64, 32)
    module = LoRALinear4bit.from_linear(dense, r=8, lora_alpha=16)
    assert module.base_layer.weight.dtype == torch.uint8
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    nn.init.normal_(module.lora_B.weight, std=0.2)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])
    ref_layer = peft.inject_adapter_in_model(config, _Holder(copy.deepcopy(module.base_layer))).proj
    ref_layer.lora_A["default"].weight.data.copy_(module.lora_A.weight)
    ref_layer.lora_B["default"].weight.data.copy_(module.lora_B.weight)
    x, grad_out = torch.randn(4, 6, 64), torch.randn(4, 6, 32)
    with use_backend("torch"):
        assert_same(run(module, x, grad_out), run(ref_layer, x, grad_out))


def test_cpu_autocast_follows_peft_dtypes() -> None:
    """Under autocast both the base and the adapter compute in the autocast dtype; the result keeps x's dtype."""
    ref_layer = peft_layer(64, 48)
    layer = copy.deepcopy(ref_layer)
    patch_peft_lora4bit(_Holder(layer))
    torch.manual_seed(6)
    x, grad_out = torch.randn(16, 64), torch.randn(16, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("torch"):
        ours = run(layer, x, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(ref_layer, x, grad_out)
    assert ours["y"].dtype == torch.float32
    assert_same(ours, ref, tol=1e-2)  # bf16 matmuls: same dtypes, not the same summation order


class _Casts(TorchDispatchMode):
    """Counts the casts to ``dtype`` of tensors shaped like one of ``shapes``."""

    def __init__(self, shapes: set[torch.Size], dtype: torch.dtype) -> None:
        super().__init__()
        self.shapes, self.dtype, self.count = shapes, dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._to_copy and out.dtype == self.dtype and out.shape in self.shapes:
            self.count += 1
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_adapter_gradients_are_written_in_the_adapter_dtype(backend: str) -> None:
    """fp32 A and B, half-precision products: the op that scales each adapter gradient writes it in fp32. A gradient
    in the products' dtype would make autograd cast it (one more launch per adapter weight per step)."""
    ref_layer = peft_layer(64, 48)
    layer = copy.deepcopy(ref_layer)
    patch_peft_lora4bit(_Holder(layer))
    torch.manual_seed(6)
    x, grad_out = torch.randn(16, 64), torch.randn(16, 48)
    dtype = torch.bfloat16 if backend == "torch" else torch.float16  # (the interpreter's bf16 tl.dot is garbage)
    adapters = {layer.lora_A["default"].weight.shape, layer.lora_B["default"].weight.shape}
    with torch.autocast("cpu", dtype=dtype), use_backend(backend):
        x_in = x.detach().clone().requires_grad_(True)
        torch.manual_seed(1)
        y = layer(x_in)
        with _Casts(adapters, torch.float32) as casts:
            y.backward(grad_out)
    assert casts.count == 0
    assert layer.lora_A["default"].weight.grad.dtype == layer.lora_B["default"].weight.grad.dtype == torch.float32
    ours = {"y": y.detach(), "x": x_in.grad, "A": layer.lora_A["default"].weight.grad,
            "B": layer.lora_B["default"].weight.grad, "bias": layer.get_base_layer().bias.grad}
    with torch.autocast("cpu", dtype=dtype):
        assert_same(ours, run(ref_layer, x, grad_out), tol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reused_adapter_casts_are_made_once_per_step_and_again_after_a_change(backend: str) -> None:
    """A checkpointed step uses each adapter weight in its forward, its recompute and its backward. Inside
    reuse_adapter_casts each weight is cast once, with bit-identical results; a weight changed in place in the block
    is cast again."""
    layer = peft_layer(64, 48)
    patch_peft_lora4bit(_Holder(layer))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(6)
    x, grad_out = torch.randn(16, 64), torch.randn(16, 48)
    dtype = torch.bfloat16 if backend == "torch" else torch.float16  # (the interpreter's bf16 tl.dot is garbage)

    def step() -> dict[str, torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        y = torch.utils.checkpoint.checkpoint(layer, x_in, use_reentrant=False)
        y.backward(grad_out)
        return {"y": y.detach(), "x": x_in.grad, "A": A.grad, "B": B.grad}

    with torch.autocast("cpu", dtype=dtype), use_backend(backend):
        with _Casts({A.shape, B.shape}, dtype) as casts:
            want = step()
        # forward and recompute: A and B; backward: A, and on the torch path B (Triton casts it in registers)
        assert casts.count == (6 if backend == "torch" else 5)
        with reuse_adapter_casts(), _Casts({A.shape, B.shape}, dtype) as casts:
            got = step()
            assert casts.count == 2
        for name in want:
            assert torch.equal(got[name], want[name]), name
        with reuse_adapter_casts():
            step()
            with torch.no_grad():
                A.mul_(0.5)
            got = step()
        want = step()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_layers_peft_must_run_are_left_to_it(caplog: pytest.LogCaptureFixture) -> None:
    layer = peft_layer(64, 32)
    holder = _Holder(layer)
    layer.update_layer("second", 4, lora_alpha=8, config=peft.LoraConfig(r=4, lora_alpha=8))
    layer.set_adapter(["default", "second"])
    with caplog.at_level(logging.WARNING):
        assert patch_peft_lora4bit(holder) == 0  # two active adapters: reported, not patched
    assert "proj: 2 active adapters" in caplog.text
    layer.set_adapter("default")
    assert patch_peft_lora4bit(holder) == 1
    assert patch_peft_lora4bit(holder) == 1  # idempotent
    x = torch.randn(5, 64)
    base_only = layer.get_base_layer()(x).detach()
    layer.enable_adapters(False)  # PEFT's own forward: the base alone
    assert rel_err(layer(x).detach(), base_only) < TOL
    layer.enable_adapters(True)
    assert rel_err(layer(x).detach(), base_only) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 3, 300, 4096])
@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_bf16_triton_equals_peft_cuda(tokens: int, strategy: str) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(2048, 512, device="cuda")
    module = LoRALinear4bit.from_linear(dense, r=16, lora_alpha=32, compute_dtype=torch.bfloat16)
    nn.init.normal_(module.lora_B.weight, std=0.05)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"])
    ref_layer = peft.inject_adapter_in_model(config, _Holder(copy.deepcopy(module.base_layer))).proj
    ref_layer.lora_A["default"].weight.data.copy_(module.lora_A.weight)
    ref_layer.lora_B["default"].weight.data.copy_(module.lora_B.weight)
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with use_backend("triton"), use_nf4_matmul(strategy):
        ours = run(module, x, grad_out)
    # PEFT may give the adapter of a bf16-compute Linear4bit bf16 weights (seen on an H100 with peft 0.21), ours are
    # fp32: the gradients are compared as values, in our dtype.
    ref = {name: grad.to(ours[name].dtype) for name, grad in run(ref_layer, x, grad_out).items()}
    assert_same(ours, ref, tol=2e-2)


def test_qkv_group_only_shares_outputs_for_the_same_input() -> None:
    """q/k/v run as one op over a shared input; a call with another input (or out of order) computes its own."""

    class Attention(nn.Module):
        is_loaded_in_4bit = True

        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (peft_layer(64, n, seed=n).get_base_layer() for n in (48, 32, 32))

    torch.manual_seed(8)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    ref = peft.inject_adapter_in_model(config, Attention())
    for name, param in ref.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)
    ours = copy.deepcopy(ref)
    assert patch_peft_lora4bit(ours) == 3
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    for order in [("q", x), ("k", y), ("v", x)], [("k", x), ("q", x), ("v", x), ("k", x)]:
        for name, inp in order:
            proj = f"{name}_proj"
            out, expected = getattr(ours, proj)(inp), getattr(ref, proj)(inp)
            assert rel_err(out.detach(), expected.detach()) < TOL, (order, name)
    # An input changed in place after the q call must not get the outputs computed before the change.
    ours.q_proj(x)
    x.mul_(2)
    assert rel_err(ours.k_proj(x).detach(), ref.k_proj(x).detach()) < TOL
