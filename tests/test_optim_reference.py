"""FusedAdamW against clip_grad_norm_ + torch.optim.AdamW, on the torch reference and the Triton backend.

The Triton kernels run in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), with chunks of
128 elements, so the odd-sized tensors below span several chunks and end in partial ones.
"""

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lamelm_fast.ops.dispatch import use_backend
from lamelm_fast.optim import FusedAdamW
from lamelm_fast.optim._adamw_torch import _bias_correction, stochastic_round_bf16

MAX_GRAD_NORM = 1.0
LR = 1e-2
# Per-backend tolerance, relative to each tensor's scale. The reference repeats torch's ops and computes the norm
# as clip_grad_norm_ does; the kernels sum squares in another order (norm within an ulp) and fuse ops differently.
REL = {"torch": 1e-6, "triton": 1e-5}


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    with use_backend(request.param):
        yield request.param


class TinyModel(nn.Module):
    """Mixed shapes: odd matrix sizes, a 3-d tensor, vectors and a 1-element tensor."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter((0.5 * torch.randn(*shape, generator=gen)).to(dtype))

        self.weight = param(37, 19)
        self.kernel = param(5, 3, 7)
        self.bias = param(37)
        self.norm = param(19)
        self.scalar = param(1)

    def groups(self) -> list[dict]:
        """Weight decay on the matrices only, like a usual LM fine-tuning setup."""
        return [
            {"params": [self.weight, self.kernel]},
            {"params": [self.bias, self.norm, self.scalar], "weight_decay": 0.0},
        ]


def fake_backward(model: nn.Module, step: int, skip_grad_of: str | None = None) -> None:
    """Fresh random gradients; their scale alternates so clipping is active on some steps only."""
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 1.0 if step % 3 == 0 else 0.02
    for name, p in model.named_parameters():
        grad = scale * torch.randn(p.shape, generator=gen)
        p.grad = None if name == skip_grad_of else grad.to(p.dtype)


def copy_grads(src: nn.Module, dst: nn.Module) -> None:
    for p_src, p_dst in zip(src.parameters(), dst.parameters(), strict=True):
        p_dst.grad = None if p_src.grad is None else p_src.grad.to(p_dst.dtype, copy=True)


def reference_step(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    return norm


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, floor: float = 0.0) -> None:
    """Elementwise closeness relative to the tensor's scale (exact zeros would defeat a pure rtol).

    ``floor`` bounds the scale from below: a value that cancels to near zero (a moment of a 1-element tensor whose
    gradient changed sign) still carries the rounding error of the larger values it was computed from.
    """
    expected = expected.to(actual.dtype)
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_matches(
    model: nn.Module, opt: FusedAdamW, ref_model: nn.Module, ref_opt: torch.optim.Optimizer, rel: float = 1e-6
) -> None:
    ref_states = [ref_opt.state.get(p, {}) for p in ref_model.parameters()]
    floors = {key: 0.01 * max((s[key].abs().max().item() for s in ref_states if s), default=0.0)
              for key in ("exp_avg", "exp_avg_sq")}
    for p, ref_p, ref_state in zip(model.parameters(), ref_model.parameters(), ref_states, strict=True):
        assert_close_rel(p.detach().double(), ref_p.detach().double(), rel)
        state = opt.state.get(p, {})
        assert state.keys() == ref_state.keys()
        if state:
            assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
            assert state["step"].item() == ref_state["step"].item()
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].dtype == torch.float32
                assert_close_rel(state[key].double(), ref_state[key].double(), rel, floors[key])


def snapshot(model: nn.Module, opt: FusedAdamW) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    tensors += [t for p in model.parameters() for t in opt.state[p].values()]
    return [t.clone() for t in tensors]


def make_pair(**kwargs) -> tuple[nn.Module, FusedAdamW, nn.Module, torch.optim.AdamW]:
    model, ref_model = TinyModel(), TinyModel()
    opt = FusedAdamW(model.groups(), lr=LR, max_grad_norm=MAX_GRAD_NORM, **kwargs)
    ref_opt = torch.optim.AdamW(ref_model.groups(), lr=LR, **kwargs)
    return model, opt, ref_model, ref_opt


def test_matches_clip_grad_norm_and_torch_adamw(backend: str) -> None:
    model, ref_model = TinyModel(), TinyModel()
    groups, ref_groups = model.groups(), ref_model.groups()
    # Second group added later: add_param_group must fill in the defaults (max_grad_norm included).
    opt = FusedAdamW([groups[0]], lr=LR, betas=(0.8, 0.99), weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM)
    opt.add_param_group(groups[1])
    ref_opt = torch.optim.AdamW([ref_groups[0]], lr=LR, betas=(0.8, 0.99), weight_decay=0.1)
    ref_opt.add_param_group(ref_groups[1])
    assert [g["max_grad_norm"] for g in opt.param_groups] == [MAX_GRAD_NORM] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]

    def lr_lambda(step: int) -> float:
        return 1.0 + 0.5 * math.sin(step)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lr_lambda)
    assert opt.grad_norm is None

    clipped = []
    for step in range(20):
        # Every 4th step one tensor gets no gradient: it must be left out of the norm and the update.
        fake_backward(model, step, skip_grad_of="norm" if step % 4 == 1 else None)
        copy_grads(model, ref_model)
        opt.step()
        ref_norm = reference_step(ref_model, ref_opt)
        sched.step()
        ref_sched.step()

        assert opt.grad_norm.dtype == torch.float32 and opt.grad_norm.dim() == 0
        torch.testing.assert_close(opt.grad_norm, ref_norm, rtol=REL[backend], atol=0)
        clipped.append(ref_norm.item() > MAX_GRAD_NORM)
        assert_matches(model, opt, ref_model, ref_opt, REL[backend])
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())

    assert any(clipped) and not all(clipped), "test must exercise clipped and unclipped steps"
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != LR
    assert opt.skipped_steps.item() == 0


def test_state_dict_round_trip_both_ways(backend: str) -> None:
    model, opt, ref_model, ref_opt = make_pair()
    for step in range(10):
        fake_backward(model, step)
        copy_grads(model, ref_model)
        opt.step()
        reference_step(ref_model, ref_opt)

    state, ref_state = opt.state_dict(), ref_opt.state_dict()
    for saved, ref_saved in zip(state["state"].values(), ref_state["state"].values(), strict=True):
        assert saved.keys() == ref_saved.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in saved:
            assert (saved[key].dtype, saved[key].shape) == (ref_saved[key].dtype, ref_saved[key].shape)

    # Cross-load: torch AdamW state into a fresh FusedAdamW and vice versa (deep copies, as from disk).
    model_from_ref = copy.deepcopy(ref_model)
    opt_from_ref = FusedAdamW(model_from_ref.groups(), max_grad_norm=MAX_GRAD_NORM)
    opt_from_ref.load_state_dict(copy.deepcopy(ref_state))
    ref_model_from_fused = copy.deepcopy(model)
    ref_opt_from_fused = torch.optim.AdamW(ref_model_from_fused.groups())
    ref_opt_from_fused.load_state_dict(copy.deepcopy(state))
    assert all(g["lr"] == LR for g in opt_from_ref.param_groups + ref_opt_from_fused.param_groups)
    assert all(g["max_grad_norm"] == MAX_GRAD_NORM for g in opt_from_ref.param_groups)
    for p in model_from_ref.parameters():
        assert opt_from_ref.state[p]["step"].device == p.device
        assert all(t.dtype == torch.float32 for t in opt_from_ref.state[p].values())

    for step in range(10, 15):
        fake_backward(model, step)
        for other in (ref_model, model_from_ref, ref_model_from_fused):
            copy_grads(model, other)
        opt.step()
        opt_from_ref.step()
        reference_step(ref_model, ref_opt)
        reference_step(ref_model_from_fused, ref_opt_from_fused)

    assert_matches(model_from_ref, opt_from_ref, ref_model, ref_opt, REL[backend])
    assert_matches(model, opt, ref_model_from_fused, ref_opt_from_fused, REL[backend])
    assert_matches(model, opt, ref_model, ref_opt, REL[backend])


def test_load_state_dict_keeps_fp32_moments_for_bf16_params() -> None:
    model = TinyModel(torch.bfloat16)
    opt = FusedAdamW(model.groups(), max_grad_norm=MAX_GRAD_NORM)
    fake_backward(model, 0)
    opt.step()
    loaded = FusedAdamW(model.groups())
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        for key, value in loaded.state[p].items():
            assert value.dtype == torch.float32
            assert torch.equal(value, opt.state[p][key])


@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_master_weights_survive_a_resume_but_not_steps_taken_without_them(stochastic_rounding: bool) -> None:
    """A bf16 param's fp32 master copy is kept on load when the param is still its rounding (a resume, also after
    stochastic rounding), and dropped when the param moved without it: torch.optim.AdamW carries our master in its
    state dict but never updates it, so loading that back must not undo torch's steps."""
    model = TinyModel(torch.bfloat16)
    opt = FusedAdamW(model.groups(), lr=LR, master_weights=True, stochastic_rounding=stochastic_rounding)
    for step in range(3):
        fake_backward(model, step)
        opt.step()
    resumed = FusedAdamW(model.groups(), lr=LR, master_weights=True, stochastic_rounding=stochastic_rounding)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["master_param"], opt.state[p]["master_param"])

    torch_opt = torch.optim.AdamW(model.groups(), lr=LR)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before_torch = [p.detach().clone() for p in model.parameters()]
    for step in range(3, 8):
        fake_backward(model, step)
        torch_opt.step()
    after_torch = [p.detach().clone() for p in model.parameters()]
    back = FusedAdamW(model.groups(), lr=LR, master_weights=True, stochastic_rounding=stochastic_rounding)
    back.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for p, before in zip(model.parameters(), before_torch, strict=True):
        moved = not torch.equal(p, before)
        # (bf16 AdamW can leave a small param where it is: its update is under half an ulp. Its master is still
        # consistent with it and kept.)
        assert ("master_param" in back.state[p]) != moved
    assert sum("master_param" not in back.state[p] for p in model.parameters()) >= 4
    fake_backward(model, 8)
    back.step()  # re-seeds each master from its param, then one AdamW step of size ~LR
    for p, before in zip(model.parameters(), after_torch, strict=True):
        assert (p.float() - before.float()).abs().max() < 2 * LR, "the params jumped back to a stale master copy"


def test_first_param_group_may_be_empty() -> None:
    model = TinyModel()
    opt = FusedAdamW([{"params": []}, *model.groups()], max_grad_norm=MAX_GRAD_NORM)
    fake_backward(model, 0)
    opt.step()
    assert opt.skipped_steps.device == model.weight.device and opt.grad_norm > 0
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradients at all: nothing moves, and the norm reported is clip_grad_norm_'s 0, not the last one
    assert opt.grad_norm.item() == 0.0 == torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()


def test_load_rejects_amsgrad_state() -> None:
    model = TinyModel()
    ref_opt = torch.optim.AdamW(model.groups(), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdamW(model.groups()).load_state_dict(ref_opt.state_dict())


@pytest.mark.parametrize("bad_value", [math.inf, math.nan])
def test_skip_on_first_step(bad_value: float, backend: str) -> None:
    """Skipping at step 0 must not leave NaN behind (the bias correction would divide by zero)."""
    model, opt, ref_model, ref_opt = make_pair()
    fake_backward(model, 0)
    model.weight.grad[3, 4] = bad_value
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(opt.state[p]["step"].item() == 0 for p in model.parameters())
    assert opt.skipped_steps.item() == 1

    for step in range(1, 6):
        fake_backward(model, step)
        copy_grads(model, ref_model)
        opt.step()
        reference_step(ref_model, ref_opt)
    assert_matches(model, opt, ref_model, ref_opt, REL[backend])


def test_non_finite_grads_skip_the_step_exactly(backend: str) -> None:
    model, opt, ref_model, ref_opt = make_pair()
    bad_steps = {3: ("weight", math.inf), 6: ("scalar", math.nan)}
    for step in range(12):
        fake_backward(model, step)
        if step in bad_steps:
            name, value = bad_steps[step]
            getattr(model, name).grad.view(-1)[0] = value
            before = snapshot(model, opt)
            skipped_before = opt.skipped_steps.clone()
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before, strict=True))
            assert opt.skipped_steps.item() == skipped_before.item() + 1
            assert not torch.isfinite(opt.grad_norm)
            continue  # the reference simply does not step
        copy_grads(model, ref_model)
        opt.step()
        reference_step(ref_model, ref_opt)
        assert_matches(model, opt, ref_model, ref_opt, REL[backend])
    assert opt.skipped_steps.item() == 2
    assert opt.skipped_steps.dtype == torch.int64 and opt.skipped_steps.dim() == 0


def test_bf16_params_with_fp32_state_track_float64_reference(backend: str) -> None:
    """bf16 params, fp32 state: compared to float64 AdamW whose params are stored as bf16 after each step.

    Rounding the reference's params like ours keeps the comparison tight: an unrounded float64 run drifts
    from any bf16 run by a random walk of rounding errors (several bf16 ulps after 20 steps).
    """
    model = TinyModel(torch.bfloat16)
    ref_model = copy.deepcopy(model).double()
    opt = FusedAdamW(model.groups(), lr=LR, max_grad_norm=MAX_GRAD_NORM)
    ref_opt = torch.optim.AdamW(ref_model.groups(), lr=LR)
    for step in range(20):
        fake_backward(model, step)
        copy_grads(model, ref_model)
        opt.step()
        reference_step(ref_model, ref_opt)
        with torch.no_grad():
            for ref_p in ref_model.parameters():
                ref_p.copy_(ref_p.to(torch.bfloat16))

    for p, ref_p in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert p.dtype == torch.bfloat16
        # fp32 vs float64 math may round a value the other way: at most one bf16 ulp (< 1e-2 relative).
        assert_close_rel(p.detach().double(), ref_p.detach(), 1e-2)
        assert (p.detach().double() == ref_p).double().mean() > 0.95
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.float32
            assert_close_rel(opt.state[p][key].double(), ref_opt.state[ref_p][key], 1e-5)


def test_params_without_grad_are_untouched(backend: str) -> None:
    model = TinyModel()
    opt = FusedAdamW(model.groups(), max_grad_norm=MAX_GRAD_NORM)
    frozen_before = model.kernel.detach().clone()
    for step in range(3):
        fake_backward(model, step, skip_grad_of="kernel")
        opt.step()
    assert torch.equal(model.kernel, frozen_before)
    assert model.kernel not in opt.state
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters() if p is not model.kernel)


def test_step_bumps_the_version_of_the_params_it_updates(backend: str) -> None:
    """As torch.optim.AdamW's in-place ops do, whatever writes the params (our kernels write through pointers):
    autograd then refuses a backward through a graph saved before the step instead of silently using the new
    weights, and a cache keyed on a param's version sees the change."""
    model = TinyModel()
    opt = FusedAdamW(model.groups(), max_grad_norm=MAX_GRAD_NORM)
    fake_backward(model, 0, skip_grad_of="kernel")
    before = {name: p._version for name, p in model.named_parameters()}
    opt.step()
    assert {name: p._version > before[name] for name, p in model.named_parameters()} == {
        name: name != "kernel" for name in before}
    for optimizer in (opt, torch.optim.AdamW(model.groups())):
        saved = (model.weight * model.weight).sum()  # its backward reads the weight as it was
        fake_backward(model, 1)
        optimizer.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()


class NoHostSync(TorchDispatchMode):
    """Fails on aten._local_scalar_dense, which .item(), bool(tensor) and float(tensor) dispatch to."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host-device sync in optimizer step")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_detector_works() -> None:
    with pytest.raises(AssertionError, match="host-device sync"), NoHostSync():
        bool(torch.ones(()) > 0)


def test_step_has_no_host_sync(backend: str) -> None:
    """Covers state init, clipping, a tensor LR and the non-finite skip path, compared to torch."""
    model, ref_model = TinyModel(), TinyModel()
    opt = FusedAdamW(model.groups(), lr=torch.tensor(LR), max_grad_norm=MAX_GRAD_NORM)
    ref_opt = torch.optim.AdamW(ref_model.groups(), lr=torch.tensor(LR))
    for step in range(4):
        fake_backward(model, step)
        if step == 2:
            model.bias.grad[0] = math.nan
        else:
            copy_grads(model, ref_model)
            reference_step(ref_model, ref_opt)
        with NoHostSync(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tensor.tolist() in optimizer step"))
            opt.step()
    assert opt.skipped_steps.item() == 1
    assert_matches(model, opt, ref_model, ref_opt, REL[backend])


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 0.9999])
def test_bias_correction_is_accurate_in_fp32(beta: float) -> None:
    """1 - beta**t in fp32 loses ~1e-5 to cancellation for beta near 1 at small t; ours must not."""
    steps = torch.arange(1, 2001, dtype=torch.float32)
    expected = torch.tensor([1 - beta**t for t in range(1, 2001)], dtype=torch.float64)
    torch.testing.assert_close(_bias_correction(beta, steps).double(), expected, rtol=1e-6, atol=0)


def test_skipped_steps_and_seed_are_saved() -> None:
    model = TinyModel()
    opt = FusedAdamW(model.groups(), max_grad_norm=MAX_GRAD_NORM, seed=7)
    fake_backward(model, 0)
    model.weight.grad[0, 0] = math.inf
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    assert state["skipped_steps"].item() == 1 and state["seed"] == 7

    loaded = FusedAdamW(model.groups(), seed=8)
    loaded.load_state_dict(state)
    assert loaded.skipped_steps.item() == 1 and loaded.seed == 7
    torch.optim.AdamW(model.groups()).load_state_dict(state)  # our extra keys do not bother torch
    loaded.load_state_dict(torch.optim.AdamW(model.groups()).state_dict())
    assert loaded.skipped_steps.item() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_track_fp32_adamw(backend: str, dtype: torch.dtype) -> None:
    """Low-precision params with an fp32 master copy follow fp32 AdamW run on the same gradient values, and the
    param is the master rounded to nearest after every step (written by the same pass)."""
    model = TinyModel(dtype)
    ref_model = copy.deepcopy(model).float()
    opt = FusedAdamW(model.groups(), lr=LR, max_grad_norm=MAX_GRAD_NORM, master_weights=True)
    ref_opt = torch.optim.AdamW(ref_model.groups(), lr=LR)
    for step in range(20):
        fake_backward(model, step)  # gradients in `dtype`; the reference gets the same values in fp32
        copy_grads(model, ref_model)
        opt.step()
        reference_step(ref_model, ref_opt)
        for p in model.parameters():
            assert torch.equal(p.detach(), opt.state[p]["master_param"].to(dtype))

    for p, ref_p in zip(model.parameters(), ref_model.parameters(), strict=True):
        master = opt.state[p]["master_param"]
        assert p.dtype == dtype and master.dtype == torch.float32
        assert_close_rel(master.double(), ref_p.detach().double(), REL[backend])
    # The master keeps what the low-precision param cannot hold.
    assert not torch.equal(opt.state[model.weight]["master_param"], model.weight.detach().float())


def test_stochastic_rounding_is_unbiased(backend: str) -> None:
    """One step moves each bf16 weight away from zero by 0.3 of its ulp. Stochastic rounding must land on the upper
    neighbour 30% of the time on average (nearest rounding never does: that would be 40 standard errors away)."""
    n, ulp, lr = 4096, 2.0**-7, 0.3 * 2.0**-7  # ulp: bf16 spacing in [1, 2)
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    start = (sign * (1 + ulp * torch.randint(0, 64, (n,), generator=gen))).to(torch.bfloat16)
    param = nn.Parameter(start.clone())
    param.grad = (-sign).to(torch.bfloat16)  # Adam's first step moves by lr against the gradient's sign
    FusedAdamW([param], lr=lr, weight_decay=0.0, stochastic_rounding=True, seed=1234).step()
    ref = nn.Parameter(start.float())
    ref.grad = param.grad.float()
    torch.optim.AdamW([ref], lr=lr, weight_decay=0.0).step()

    moved = (param.detach().double() - start.double()) / (sign.double() * ulp)
    expected = (ref.detach().double() - start.double()) / (sign.double() * ulp)
    assert set(moved.unique().tolist()) <= {0.0, 1.0}, "must round to one of the two neighbours"
    assert 0.29 < expected.mean().item() < 0.31
    standard_error = math.sqrt(0.3 * 0.7 / n)
    assert abs(moved.mean().item() - expected.mean().item()) < 5 * standard_error


def test_stochastic_rounding_draws_fresh_bits_per_step_param_and_seed() -> None:
    """Independent draws agree on the rounding direction with probability 0.3**2 + 0.7**2 = 0.58, reused bits always."""
    value = torch.full((4096,), 1 + 0.3 * 2.0**-7)
    base = stochastic_round_bf16(value, 7, 0, torch.tensor(1.0))
    assert 0.25 < (base.double() > 1).double().mean().item() < 0.35
    for seed, param_id, step in ((7, 0, 2.0), (7, 1, 1.0), (8, 0, 1.0)):
        other = stochastic_round_bf16(value, seed, param_id, torch.tensor(step))
        assert 0.5 < (other == base).double().mean().item() < 0.67


def test_stochastic_rounding_draws_the_same_bits_on_every_backend() -> None:
    params = {}
    for name in ("torch", "triton"):
        model = TinyModel(torch.bfloat16)
        opt = FusedAdamW(model.groups(), lr=LR, max_grad_norm=MAX_GRAD_NORM, stochastic_rounding=True, seed=99)
        with use_backend(name):
            for step in range(3):
                fake_backward(model, step)
                opt.step()
        params[name] = torch.cat([p.detach().view(-1) for p in model.parameters()])
    # Equal bits, except where the backends' fp32 values differ in the last place right at a rounding boundary
    # (rare); a different hash would agree on about half the elements only.
    assert (params["torch"] == params["triton"]).double().mean().item() > 0.99


def test_trainer_uses_fused_adamw() -> None:
    from lamelm_fast.train.config import TrainConfig
    from lamelm_fast.train.loop import make_optimizer

    opt = make_optimizer(TinyModel(), TrainConfig(learning_rate=1e-3, max_grad_norm=0.5, weight_decay=0.1))
    assert isinstance(opt, FusedAdamW)
    assert [g["max_grad_norm"] for g in opt.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("fp32", [False, True], ids=["bf16-master-stochastic", "fp32-fused-kernel"])
def test_reference_cuts_large_tensors_into_pieces(monkeypatch: pytest.MonkeyPatch, fp32: bool) -> None:
    """The torch backend bounds its temporaries by updating flat pieces of tensors; pieces must not change results
    (stochastic rounding included: its element index counts from the start of the tensor; torch's fused kernel,
    which fp32 takes on CPU, included: the pieces of one tensor share its step counter)."""
    from lamelm_fast.optim import _adamw_torch

    results = []
    for piece in (_adamw_torch._PIECE, 64):
        monkeypatch.setattr(_adamw_torch, "_PIECE", piece)
        model = TinyModel(torch.float32 if fp32 else torch.bfloat16)
        opt = FusedAdamW(model.groups(), lr=LR, max_grad_norm=MAX_GRAD_NORM, master_weights=not fp32,
                         stochastic_rounding=not fp32, seed=3)
        with use_backend("torch"):
            for step in range(3):
                fake_backward(model, step)
                opt.step()
        results.append(snapshot(model, opt))
    for whole, pieces in zip(*results, strict=True):
        torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=0)
    assert torch.equal(results[0][0], results[1][0])  # the weight: 703 elements in 11 pieces


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("dtype", "master", "fused"), [(torch.float32, False, True), (torch.bfloat16, True, False),
                                                        (torch.bfloat16, False, False)])
def test_cpu_reference_takes_torchs_fused_kernel_where_it_applies(dtype: torch.dtype, master: bool,
                                                                  fused: bool) -> None:
    """On CPU the torch backend updates fp32 params with aten._fused_adamw_ (one pass in place, no per-tensor
    selects); a master copy or bf16 params with fp32 moments keep the foreach ops, which it cannot do."""
    model = TinyModel(dtype)
    opt = FusedAdamW(model.groups(), lr=LR, max_grad_norm=MAX_GRAD_NORM, master_weights=master)
    with use_backend("torch"):
        for step in range(2):
            fake_backward(model, step)
            with _OpCounter() as counted:
                opt.step()
    assert (counted.ops.get("aten._fused_adamw_", 0) > 0) == fused
    assert ("aten.where" in counted.ops) != fused
