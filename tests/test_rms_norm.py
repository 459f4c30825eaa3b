"""The fused RMSNorm against Hugging Face's formula evaluated in float64, on both backends, and patch_rms_norm on tiny
Llama, Gemma, Gemma3 and Qwen3 models against the unpatched models.

The Triton kernels run under TRITON_INTERPRET=1 on CPU. The interpreter rounds fp32 -> bf16 toward zero (the GPU
rounds to nearest even), so 16-bit results are compared within one ulp of the truncation, 1e-2 relative.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from conftest import assert_same_training, model_loss_and_grads, tiny_llama_config
from lamelm_fast.ops import rms_norm as rms_norm_module
from lamelm_fast.ops.dispatch import BackendUnavailable, use_backend
from lamelm_fast.ops.rms_norm import _formula_holds, _FusedRMSNorm, patch_rms_norm, rms_norm, rms_norm_reference

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
EPS = 1e-6


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    with use_backend(request.param):
        yield request.param


pytestmark = pytest.mark.usefixtures("single_thread")


def reference64(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool, *,
                x_dtype: torch.dtype | None = None, w_dtype: torch.dtype | None = None) -> torch.Tensor:
    """HF's formula in float64 on the same values (x and weight may require grad). The roundings HF's formula does on
    the way (xhat to the input dtype, offset + weight in the weight's dtype, Llama mode) round the value here too, and
    pass the gradient through unchanged; the result is not rounded. ``x_dtype`` / ``w_dtype``: the dtypes those
    roundings go to (default: the tensors' own)."""
    h = x.double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.double() + offset
    if cast_before_weight:
        h = h + (h.to(x_dtype or x.dtype).double() - h).detach()
        w = w + (w.to(w_dtype or weight.dtype).double() - w).detach()
    return w * h


def tolerance(*dtypes: torch.dtype) -> float:
    return 1e-5 if all(d == f32 for d in dtypes) else 1e-2


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * max(scale, 1e-30))


def make_inputs(shape: tuple[int, ...], x_dtype: torch.dtype, w_dtype: torch.dtype, offset: float,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3).to(x_dtype)
    # Gemma stores w with the 1 taken out (weights near 0); Llama stores it (near 1).
    w = ((0.0 if offset else 1.0) + 0.3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(w_dtype)
    return x, w


def check_against_reference(x: torch.Tensor, w: torch.Tensor, *, offset: float, cast_before_weight: bool,
                            x_grad: bool = True, weight_grad: bool = True, seed: int = 1) -> torch.Tensor:
    x = x.detach().requires_grad_(x_grad)
    w = w.detach().requires_grad_(weight_grad)
    y = rms_norm(x, w, EPS, offset=offset, cast_before_weight=cast_before_weight)
    expected_dtype = torch.promote_types(x.dtype, w.dtype) if cast_before_weight else x.dtype
    assert y.dtype == expected_dtype and y.shape == x.shape
    tol = tolerance(x.dtype, w.dtype)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    want = reference64(x64, w64, EPS, offset, cast_before_weight, x_dtype=x.dtype, w_dtype=w.dtype)
    assert_close(y, want, tol)

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dy = dy.to(device=y.device, dtype=y.dtype)
    y.backward(dy)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), dy.double())
    if x_grad:
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert_close(x.grad, want_dx, tol)
    else:
        assert x.grad is None
    if weight_grad:
        assert w.grad.dtype == w.dtype and w.grad.shape == w.shape
        assert_close(w.grad, want_dw, tol)
    else:
        assert w.grad is None
    return y


# (shape, x dtype, weight dtype, offset, cast_before_weight, weight requires grad)
CASES = [
    ((3, 5, 37), f32, f32, 0.0, True, True),  # Llama, fp32 everywhere
    ((7, 130), f32, f32, 1.0, False, True),  # Gemma, fp32
    ((7, 130), bf16, f32, 0.0, True, True),  # bf16 activations, fp32 norm weight: fp32 out
    ((7, 130), bf16, bf16, 0.0, True, True),
    ((2, 9, 100), bf16, bf16, 1.0, False, True),  # Gemma bf16
    ((7, 130), f16, f16, 0.0, True, False),  # frozen norm weight (QLoRA): no dW
    ((5, 37), f32, bf16, 0.0, True, True),  # bf16 weight on fp32 input: fp32 out, bf16 dW
    ((6, 3, 128), bf16, f32, 1.0, False, False),  # Qwen3/Gemma3 head-dim norm width, many rows per program
    ((4, 3, 16), f32, bf16, 1.0, True, True),  # offset in the Llama mode: added in the weight's dtype
]


@pytest.mark.parametrize(("shape", "x_dtype", "w_dtype", "offset", "cast", "weight_grad"), CASES)
def test_forward_and_backward_match_float64_reference(backend: str, shape: tuple[int, ...], x_dtype: torch.dtype,
                                                      w_dtype: torch.dtype, offset: float, cast: bool,
                                                      weight_grad: bool) -> None:
    x, w = make_inputs(shape, x_dtype, w_dtype, offset)
    check_against_reference(x, w, offset=offset, cast_before_weight=cast, weight_grad=weight_grad)


def test_only_the_weight_needs_a_gradient(backend: str) -> None:
    x, w = make_inputs((9, 70), f32, f32, 0.0)
    check_against_reference(x, w, offset=0.0, cast_before_weight=True, x_grad=False)


def test_llama_mode_rounds_xhat_to_the_input_dtype_before_the_weight(backend: str) -> None:
    """With powers-of-two weights y / w is exact, so it must be a bf16 value: xhat rounded before the multiply (a
    kernel that multiplied first would give fp32 values off the bf16 grid). Likewise the weight gradient of one row
    with a power-of-two dy: dW / dy is the rounded xhat the forward multiplied by."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 50, generator=gen).to(bf16)
    w = (2.0 ** torch.randint(-2, 3, (50,), generator=gen).float()).requires_grad_()
    y = rms_norm(x, w, EPS)
    assert y.dtype == f32
    ratio = y.detach() / w.detach()
    assert torch.equal(ratio.to(bf16).float(), ratio)
    xhat = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS)
    torch.testing.assert_close(ratio.double(), xhat, rtol=2**-7, atol=0.0)

    dy = torch.zeros_like(y)
    dy[2] = 2.0 ** torch.randint(-2, 3, (50,), generator=gen).float()
    y.backward(dy)
    dw_ratio = w.grad / dy[2]
    assert torch.equal(dw_ratio.to(bf16).float(), dw_ratio)
    torch.testing.assert_close(dw_ratio.double(), xhat[2], rtol=2**-7, atol=0.0)


def test_llama_mode_adds_an_offset_in_the_weight_dtype(backend: str) -> None:
    """offset + weight is rounded to the weight's dtype, as torch's ``(1.0 + weight)`` is: with bf16 weights in
    (0, 2^-9) it is exactly 1 (both round-to-nearest and the interpreter's truncation give 1), so y = xhat."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 40, generator=gen)
    w = (torch.rand(40, generator=gen) * 2.0**-9).to(bf16)
    assert (w > 0).all()
    y = rms_norm(x, w, EPS, offset=1.0)
    assert y.dtype == f32
    torch.testing.assert_close(y, rms_norm(x, torch.ones(40, dtype=bf16), EPS), rtol=0, atol=0)
    assert_close(y, x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS), 1e-6)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(f32, f32), (bf16, f32), (bf16, bf16), (f32, bf16)])
def test_matches_the_transformers_modules(backend: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = make_inputs((5, 40), x_dtype, w_dtype, 0.0)
    for module, offset, cast in ((LlamaRMSNorm(40, eps=1e-5), 0.0, True), (GemmaRMSNorm(40, eps=1e-5), 1.0, False)):
        module.weight.data = w.clone()
        with torch.no_grad():
            want = module(x)
            got = rms_norm(x, w, 1e-5, offset=offset, cast_before_weight=cast)
        assert got.dtype == want.dtype
        if backend == "torch":
            assert torch.equal(got, want)
        else:
            assert_close(got, want, 1e-6 if x_dtype == w_dtype == f32 else 1e-2)


@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_3d"])
def test_non_contiguous_inputs(backend: str, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    if layout == "row_slice":  # rows 50 apart: passed to the kernel as a row stride, no copy
        x = torch.randn(9, 50, generator=gen)[:, 3:40]
    elif layout == "transposed":  # last dim not contiguous: copied
        x = torch.randn(37, 6, generator=gen).t()
    else:  # leading dims that do not merge into one stride: reshape copies
        x = torch.randn(4, 6, 40, generator=gen)[:, ::2, 1:38]
    assert not x.is_contiguous()
    seen_strides: list[int] = []
    if backend == "triton":
        from lamelm_fast.kernels import rms_norm as kernels

        launch = kernels.rms_norm_forward

        def spy(x2d: torch.Tensor, *args: object, **kwargs: object) -> None:
            seen_strides.append(x2d.stride(0))
            launch(x2d, *args, **kwargs)

        monkeypatch.setattr(kernels, "rms_norm_forward", spy)
    w = 1 + 0.3 * torch.randn(x.shape[-1], generator=gen)
    check_against_reference(x, w, offset=0.0, cast_before_weight=True)
    if backend == "triton" and layout == "row_slice":
        assert seen_strides == [50]


@pytest.mark.parametrize("shape", [(0, 37), (2, 0, 37)])
def test_zero_rows(backend: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(37, requires_grad=True)
    y = rms_norm(x, w, EPS)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(37))


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(f32, f32), (bf16, bf16)])
def test_wide_rows(backend: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    x, w = make_inputs((3, 5000), x_dtype, w_dtype, 0.0)  # BLOCK 8192, one row per program
    check_against_reference(x, w, offset=0.0, cast_before_weight=True)


def test_rows_wider_than_the_kernel_are_refused_or_left_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from lamelm_fast.kernels.rms_norm import MAX_HIDDEN, _launch_config

    with pytest.raises(ValueError, match="at most"):
        _launch_config(MAX_HIDDEN + 1)
    x = torch.randn(2, MAX_HIDDEN + 1)
    w = torch.ones(MAX_HIDDEN + 1)
    with use_backend("triton"), pytest.raises(BackendUnavailable):
        rms_norm(x, w, EPS)
    # auto on a GPU would pick Triton: the row is too wide for it, so the reference runs instead.
    monkeypatch.setattr(rms_norm_module, "resolve_backend", lambda device: "triton")
    with use_backend("auto"):
        assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))


def test_no_grad_forward_and_deterministic_weight_gradient() -> None:
    x, w = make_inputs((40, 24), f32, f32, 0.0)  # 40 rows: several programs, several tiles each
    with use_backend("triton"):
        with torch.no_grad():
            y0 = rms_norm(x, w, EPS)
        grads = []
        for _ in range(2):
            wr = w.clone().requires_grad_()
            y = rms_norm(x, wr, EPS)
            y.backward(torch.ones_like(y))
            grads.append(wr.grad)
    assert torch.equal(y0, y.detach())
    assert torch.equal(grads[0], grads[1])
    assert_close(grads[0], _dw64(x, w), 1e-5)


def _dw64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w64 = w.double().requires_grad_()
    (dw,) = torch.autograd.grad(reference64(x, w64, EPS, 0.0, True, w_dtype=w.dtype).sum(), (w64,))
    return dw


def test_validation() -> None:
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(3, 8), torch.ones(7), EPS)
    with pytest.raises(ValueError, match="floating"):
        rms_norm(torch.ones(3, 8, dtype=torch.int64), torch.ones(8), EPS)


# --- patch_rms_norm on tiny models ----------------------------------------------------------------------------------

VOCAB = 64


def tiny_model(family: str) -> nn.Module:
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
                  use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(tiny_llama_config(VOCAB))
    elif family == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common))
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=16)
        model = transformers.Gemma3ForCausalLM(config)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():  # norm weights off their init (ones / zeros), so that a wrong offset shows
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.data += 0.3 * torch.randn(module.weight.shape, generator=gen)
    return model.float()


NORMS = {"llama": 5, "gemma": 5, "gemma3": 2 * 6 + 1, "qwen3": 2 * 4 + 1}  # per layer (q/k norms too) + final


def assert_same_loss_and_grads(patched: nn.Module, reference: nn.Module, ids: torch.Tensor, exact: bool) -> None:
    assert_same_training(model_loss_and_grads(patched, ids), model_loss_and_grads(reference, ids), exact=exact,
                         loss_rtol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize("family", sorted(NORMS))
def test_patched_model_matches_the_unpatched_one(backend: str, family: str) -> None:
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("RMSNorm")}

    assert patch_rms_norm(model) == NORMS[family]
    assert patch_rms_norm(model) == NORMS[family]  # idempotent
    fused = [m for m in model.modules() if isinstance(m, _FusedRMSNorm)]
    assert len(fused) == NORMS[family] and {type(m).__name__ for m in fused} == {f"Fused{c}" for c in classes}
    assert all(type(m).__bases__[1].__name__ in classes for m in fused)  # still an instance of its own class
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)

    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    assert_same_loss_and_grads(model, reference, ids, exact=backend == "torch")


def test_gradient_checkpointing_and_a_copy_of_a_patched_model() -> None:
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    patch_rms_norm(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reference.train()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        assert_same_loss_and_grads(model, reference, ids, exact=False)
        assert_same_loss_and_grads(copy.deepcopy(model), reference, ids, exact=False)


def test_under_a_peft_wrapper_with_frozen_norms() -> None:
    peft = pytest.importorskip("peft")
    models = []
    for _ in range(2):
        model = peft.get_peft_model(tiny_model("qwen3"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(3))
        models.append(model)
    assert patch_rms_norm(models[0]) == NORMS["qwen3"]
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        assert_same_loss_and_grads(*models, ids, exact=False)  # norm weights frozen: only LoRA grads


class LlamaRMSNorm(nn.Module):  # the name of a class we fuse, but not transformers' class: must be left alone
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_unknown_classes_and_formulas_are_left_alone() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFLlamaRMSNorm

    container = nn.Sequential(LlamaRMSNorm(8), nn.LayerNorm(8))
    assert patch_rms_norm(container) == 0
    assert type(container[0]) is LlamaRMSNorm
    # The once-per-class probe tells the two casting modes apart and rejects a different forward.
    assert _formula_holds(HFLlamaRMSNorm, rms_norm_module._LLAMA)
    assert _formula_holds(GemmaRMSNorm, rms_norm_module._GEMMA)
    assert not _formula_holds(GemmaRMSNorm, rms_norm_module._LLAMA)
    assert not _formula_holds(HFLlamaRMSNorm, rms_norm_module._GEMMA)
    assert not _formula_holds(LlamaRMSNorm, rms_norm_module._LLAMA)


# --- GPU: real shapes, and row offsets past 2^31 ---------------------------------------------------------------------


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize(("shape", "x_dtype", "w_dtype", "offset", "cast", "weight_grad"), [
    ((8192, 2048), f32, f32, 0.0, True, False),  # QLoRA residual stream, frozen norm
    ((2, 4096, 4096), bf16, bf16, 0.0, True, True),  # full fine-tune
    ((8192, 3072), bf16, bf16, 1.0, False, True),  # Gemma
    ((4096, 16, 128), bf16, f32, 0.0, True, True),  # Qwen3 q_norm, fp32 weight
])
def test_gpu_real_shapes(shape: tuple[int, ...], x_dtype: torch.dtype, w_dtype: torch.dtype, offset: float,
                         cast: bool, weight_grad: bool) -> None:
    """On the GPU (round-to-nearest-even, unlike the interpreter) the forward gives HF's exact bits except where the
    fp32 rstd differs by an ulp; gradients within rounding of the float64 reference."""
    x, w = make_inputs(shape, x_dtype, w_dtype, offset)
    x, w = x.cuda(), w.cuda()
    with use_backend("triton"):
        y = check_against_reference(x, w, offset=offset, cast_before_weight=cast, weight_grad=weight_grad)
    hf = rms_norm_reference(x, w, EPS, offset=offset, cast_before_weight=cast)
    if x_dtype == f32:  # an ulp of rstd shows in every fp32 output of its row
        assert_close(y.detach(), hf, 1e-6)
    else:  # 16-bit roundings (of xhat, or of y) absorb it but for rare ties
        assert (y.detach() == hf).float().mean().item() > 0.99


@pytest.mark.gpu
@NEEDS_CUDA
def test_gpu_row_offsets_past_2_to_the_31() -> None:
    hidden = 2048
    rows = 2**31 // hidden + 3  # the last rows start past element 2^31
    x = torch.randn(rows, hidden, device="cuda", dtype=bf16).requires_grad_()
    w = 1 + 0.1 * torch.randn(hidden, device="cuda")
    with use_backend("triton"):
        y = rms_norm(x, w, EPS)
        dy = torch.randn_like(y)
        y.backward(dy)
    tail_x = x.detach()[-5:].double().requires_grad_()
    want = reference64(tail_x, w.double(), EPS, 0.0, True, x_dtype=bf16, w_dtype=f32)
    assert_close(y.detach()[-5:], want, 1e-2)
    (want_dx,) = torch.autograd.grad(want, (tail_x,), dy[-5:].double())
    assert_close(x.grad[-5:], want_dx, 1e-2)
