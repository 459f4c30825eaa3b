"""FusedAdamW re-uses the last step's tensors, buckets and device tables while only the gradients changed.

Every way the cached plan can go stale must rebuild it: gradients at new addresses or new tensors at old ones, a
param's ``.data`` replaced, gradients appearing and disappearing, a non-contiguous or re-typed gradient,
load_state_dict, add_param_group, group switches. Each case is compared with clip_grad_norm_ + torch.optim.AdamW
(or, where torch has no equivalent, with a FusedAdamW that rebuilds everything every step), on the torch
reference, the Triton (interpreted) and the CUDA backend's Python side (with the stand-in extension).
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_adamw_cuda_tables import fake_cuda  # noqa: F401  (fixture)
from torch import nn

from lamelm_fast.ops.dispatch import use_backend
from lamelm_fast.optim import FusedAdamW

MAX_GRAD_NORM = 1.0
LR = 1e-2
SHAPES = [(37, 19), (5, 3, 7), (37,), (300,), (1,), (4, 4)]
REL = {"torch": 1e-6, "triton": 1e-5, "cuda": 1e-5}


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "cuda":
        request.getfixturevalue("fake_cuda")
        yield "cuda"
        return
    with use_backend(request.param):
        yield request.param


def make_params(dtype: torch.dtype = torch.float32, shapes: list[tuple[int, ...]] = SHAPES) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter((0.5 * torch.randn(s, generator=gen)).to(dtype)) for s in shapes]


def new_grads(step: int, shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 1.0 if step % 3 == 0 else 0.02  # clipped on some steps only
    return [scale * torch.randn(s, generator=gen) for s in shapes]


def set_grads(params: list[nn.Parameter], step: int, without: tuple[int, ...] = ()) -> None:
    for i, (p, g) in enumerate(zip(params, new_grads(step, [tuple(p.shape) for p in params]), strict=True)):
        p.grad = None if i in without else g.to(p.dtype)


def copy_grads(src: list[nn.Parameter], dst: list[nn.Parameter]) -> None:
    for s, d in zip(src, dst, strict=True):
        d.grad = None if s.grad is None else s.grad.to(d.dtype, copy=True)


def reference_step(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], MAX_GRAD_NORM)
    opt.step()
    return norm


def assert_matches(params: list[nn.Parameter], opt: FusedAdamW, ref: list[nn.Parameter],
                   ref_opt: torch.optim.Optimizer, rel: float) -> None:
    for p, r in zip(params, ref, strict=True):
        scale = r.detach().abs().max().item()
        torch.testing.assert_close(p.detach(), r.detach(), rtol=rel, atol=rel * scale)
        state, ref_state = opt.state.get(p, {}), ref_opt.state.get(r, {})
        assert state.keys() == ref_state.keys()
        if state:
            assert state["step"].item() == ref_state["step"].item()
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], ref_state[key], rtol=rel,
                                           atol=rel * ref_state[key].abs().max().item() + 1e-12)


def run_against_torch(backend: str, steps: int, before_step: Callable[..., None],
                      groups: Callable[[list[nn.Parameter]], list] = lambda params: params) -> list[object]:
    """Runs ``steps`` steps of FusedAdamW and of clip_grad_norm_ + torch.optim.AdamW on equal params; before each
    step ``before_step(step, params, opt, ref, ref_opt)`` sets the gradients (and changes whatever the test
    changes) on ``params``/``opt`` and the same on ``ref``/``ref_opt``. Returns the cached `StepTensors` of each
    step (None where the step could not cache), to tell re-used steps from rebuilt ones."""
    params, ref = make_params(), make_params()
    opt = FusedAdamW(groups(params), lr=LR, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM)
    ref_opt = torch.optim.AdamW(groups(ref), lr=LR, weight_decay=0.1)
    works = []
    for step in range(steps):
        before_step(step, params, opt, ref, ref_opt)
        opt.step()
        ref_norm = reference_step(ref, ref_opt)
        torch.testing.assert_close(opt.grad_norm, ref_norm, rtol=REL[backend], atol=0)
        assert_matches(params, opt, ref, ref_opt, REL[backend])
        works.append(None if opt._plan is None else opt._plan.work)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    return works


def test_gradients_at_new_and_at_the_same_addresses(backend: str) -> None:
    """Fresh gradient tensors every step, alternately newly allocated and new tensor objects over the same memory
    (as the CUDA caching allocator hands out): the plan made at step 0 serves every later step."""
    buffers = [torch.empty(s) for s in SHAPES]
    addresses = []

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        set_grads(params, step)
        if step % 2:
            for p, buffer in zip(params, buffers, strict=True):
                buffer.copy_(p.grad)
                p.grad = buffer.view(p.shape)  # a new tensor object at the same address as two steps ago
        addresses.append([p.grad.data_ptr() for p in params])
        copy_grads(params, ref)

    works = run_against_torch(backend, 7, before_step)
    assert addresses[1] == addresses[3] and addresses[0] != addresses[1]
    assert works[0] is not None and all(w is works[0] for w in works)


def test_param_data_replaced(backend: str) -> None:
    """``p.data = ...`` (new storage; as module.to() does) moves the param: the old pointer must not be written."""

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        if step == 3:
            for model in (params, ref):
                model[0].data = model[0].data * 0.5 + 0.25  # new values at a new address
                model[3].data = model[3].data.clone()  # same values at a new address
        set_grads(params, step)
        copy_grads(params, ref)

    works = run_against_torch(backend, 6, before_step)
    assert works[0] is works[1] is works[2] is not works[3]
    assert works[3] is works[4] is works[5]


def test_param_data_replaced_by_another_shape_is_refused(backend: str) -> None:
    """A ``.data`` of another shape (a vocabulary resized in place) leaves moments that cannot be the param's: the
    rebuilt step refuses it by name, before any backend reads the moments as if they were the param's size."""
    params = make_params()
    opt = FusedAdamW(params, lr=LR, max_grad_norm=MAX_GRAD_NORM)
    set_grads(params, 0)
    opt.step()
    params[2].data = torch.randn(4000)
    set_grads(params, 1)
    with pytest.raises(RuntimeError, match=r"param 2 of param group 0 has shape \[4000\].*'exp_avg' has shape \[37\]"):
        opt.step()
    del opt.state[params[2]]  # the way out the message names
    opt.step()
    assert opt.state[params[2]]["exp_avg"].shape == (4000,)


def test_gradients_appearing_and_disappearing(backend: str) -> None:
    """Param 1 gets its first gradient at step 2 (state created then); param 4 has none at step 4 only."""

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        without = (1,) if step < 2 else (4,) if step == 4 else ()
        set_grads(params, step, without)
        copy_grads(params, ref)

    works = run_against_torch(backend, 7, before_step)
    assert works[0] is works[1] is not works[2]
    assert works[2] is works[3] is not works[4] is not works[5]
    assert works[5] is works[6]


def test_non_contiguous_gradient(backend: str) -> None:
    """A gradient that is a transposed view (same shape, other strides) for two steps."""

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        set_grads(params, step)
        if step in (2, 3):
            params[0].grad = params[0].grad.t().contiguous().t()
            assert not params[0].grad.is_contiguous()
        copy_grads(params, ref)

    works = run_against_torch(backend, 5, before_step)
    assert works[2] is None and works[3] is None  # rebuilt every step while the gradient must be copied
    assert works[0] is works[1] and works[4] is not None


def test_load_state_dict_mid_run(backend: str) -> None:
    """State saved at step 2 and loaded back at step 5: the moments and step counters the kernels use must be the
    loaded ones (a stale plan would keep updating the replaced tensors)."""
    saved = {}

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        if step == 2:
            saved["ours"], saved["ref"] = copy.deepcopy(opt.state_dict()), copy.deepcopy(ref_opt.state_dict())
        if step == 5:
            opt.load_state_dict(saved["ours"])
            ref_opt.load_state_dict(saved["ref"])
            assert opt.state[params[0]]["step"].item() == 2
        set_grads(params, step)
        copy_grads(params, ref)

    works = run_against_torch(backend, 8, before_step)
    assert works[4] is not works[5] and works[5] is works[7]


def test_add_param_group_mid_run(backend: str) -> None:
    """Params 4 and 5 join in a second group (no weight decay) at step 3."""

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        if step == 3:
            opt.add_param_group({"params": params[4:], "weight_decay": 0.0})
            ref_opt.add_param_group({"params": ref[4:], "weight_decay": 0.0})
        set_grads(params, step, without=(4, 5) if step < 3 else ())
        copy_grads(params, ref)

    works = run_against_torch(backend, 6, before_step, groups=lambda params: params[:4])
    assert works[2] is not works[3] and works[3] is works[5]


def test_state_cleared_by_hand(backend: str) -> None:
    """``opt.state.clear()`` (fewer entries) starts every param afresh, as in torch."""

    def before_step(step: int, params: list[nn.Parameter], opt, ref: list[nn.Parameter], ref_opt) -> None:
        if step == 3:
            opt.state.clear()
            ref_opt.state.clear()
        set_grads(params, step)
        copy_grads(params, ref)

    works = run_against_torch(backend, 5, before_step)
    assert works[2] is not works[3]


def test_changes_torch_cannot_mirror_equal_a_run_without_cache(backend: str) -> None:
    """A gradient re-typed through ``.data`` and a group switching its master copy on: the cached run equals, bit
    for bit, one that drops its plan before every step (the optimizer without any caching)."""
    runs = []
    for cached in (True, False):
        params = make_params(torch.bfloat16)
        opt = FusedAdamW(params, lr=LR, max_grad_norm=MAX_GRAD_NORM)
        for step in range(7):
            set_grads(params, step)
            if step in (2, 3):
                params[1].grad.data = params[1].grad.data.float()  # fp32 gradient of a bf16 param
            if step == 5:  # alone: the step before already re-used the plan
                opt.param_groups[0]["master_weights"] = True
            if not cached:
                opt._plan = None
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append([t.clone() for p in params for t in (p.detach(), *opt.state[p].values())])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert "master_param" in opt.state[params[0]]


def test_step_keeps_no_gradient_alive(backend: str) -> None:
    """The plan outlives the step; the gradients must not (they can be a model's worth of memory)."""
    params = make_params()
    opt = FusedAdamW(params, lr=LR, max_grad_norm=MAX_GRAD_NORM)
    for step in range(2):
        set_grads(params, step)
        grads = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(g() is None for g in grads)
    assert opt._plan is not None


def test_host_time_script_runs() -> None:
    """bench/adamw_host_time.py (the before/after numbers of bench/NOTES-adamw.md) keeps working."""
    script = Path(__file__).resolve().parents[1] / "bench" / "adamw_host_time.py"
    result = subprocess.run([sys.executable, str(script), "--repeats", "2"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "448 tensors" in result.stdout and "autograd" in result.stdout
