"""FusedAdamW takes torch.optim.AdamW's keyword arguments, carries its param-group keys, and refuses the options
that change the math it does not implement (amsgrad, maximize, differentiable) with a ValueError naming them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lamelm_fast.ops.dispatch import use_backend
from lamelm_fast.optim import FusedAdamW

TORCH_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                  "fused": None}
OUR_KEYS = {"max_grad_norm", "master_weights", "stochastic_rounding"}


def params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=gen)), nn.Parameter(torch.randn(3, generator=gen))]


def steps(opt: torch.optim.Optimizer, ps: list[nn.Parameter], count: int = 3) -> None:
    for step in range(count):
        gen = torch.Generator().manual_seed(100 + step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def torch_group_keys() -> set[str]:
    return set(torch.optim.AdamW(params()).param_groups[0])


def test_torch_defaults_are_accepted_and_groups_carry_torch_keys() -> None:
    opt = FusedAdamW(params(), lr=1e-3, **TORCH_DEFAULTS)
    assert set(opt.param_groups[0]) == torch_group_keys() | OUR_KEYS
    assert set(opt.state_dict()["param_groups"][0]) == torch_group_keys() | OUR_KEYS
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("option", [{"foreach": True}, {"fused": True}, {"capturable": True}, {"foreach": False}])
def test_implementation_choices_are_kept_and_change_nothing(option: dict[str, Any]) -> None:
    ours, plain = params(), params()
    with use_backend("torch"):
        opt = FusedAdamW(ours, lr=1e-2, max_grad_norm=1.0, **option)
        steps(opt, ours)
        steps(FusedAdamW(plain, lr=1e-2, max_grad_norm=1.0), plain)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain, strict=True))
    assert opt.param_groups[0].items() >= option.items()


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "differentiable"])
def test_math_changing_options_are_refused(option: str) -> None:
    with pytest.raises(ValueError, match=rf"{option}=True: .*torch\.optim\.AdamW"):
        FusedAdamW(params(), **{option: True})
    with pytest.raises(ValueError, match=rf"{option}=True"):  # per group too
        FusedAdamW([{"params": params(), option: True}])
    opt = FusedAdamW(params())
    with pytest.raises(ValueError, match=rf"{option}=True"):
        opt.add_param_group({"params": params(1), option: True})
    assert len(opt.param_groups) == 1  # the refused group was not added


def test_positional_amsgrad_is_not_taken_for_max_grad_norm() -> None:
    # torch.optim.AdamW(params, lr, betas, eps, weight_decay, amsgrad): here the 6th is max_grad_norm
    with pytest.raises(TypeError, match="amsgrad"):
        FusedAdamW(params(), 1e-3, (0.9, 0.999), 1e-8, 1e-2, True)


def test_torch_keys_survive_state_dict_round_trips() -> None:
    ps = params()
    ref = torch.optim.AdamW(ps, lr=1e-2, foreach=True)
    steps(ref, ps)
    opt = FusedAdamW(ps)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt.param_groups[0]["foreach"] is True and opt.param_groups[0]["lr"] == 1e-2
    steps(opt, ps)

    back = torch.optim.AdamW(ps)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert set(back.param_groups[0]) >= torch_group_keys() and back.param_groups[0]["foreach"] is True
    steps(back, ps)


def test_state_dict_without_torch_keys_still_loads() -> None:
    """A FusedAdamW state dict saved before the groups carried torch's keys."""
    ps = params()
    opt = FusedAdamW(ps, max_grad_norm=1.0)
    steps(opt, ps)
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        for key in (*TORCH_DEFAULTS, "decoupled_weight_decay"):
            del group[key]
    loaded = FusedAdamW(ps, fused=True)
    loaded.load_state_dict(state)
    assert set(loaded.param_groups[0]) == torch_group_keys() | OUR_KEYS
    assert loaded.param_groups[0]["fused"] is True and loaded.param_groups[0]["max_grad_norm"] == 1.0
    steps(loaded, ps)


def test_load_refuses_state_with_math_it_does_not_implement() -> None:
    with pytest.raises(ValueError, match="differentiable=True"):
        FusedAdamW(params()).load_state_dict(torch.optim.AdamW(params(), differentiable=True).state_dict())
    with pytest.raises(ValueError, match="maximize=True"):
        FusedAdamW(params()).load_state_dict(torch.optim.AdamW(params(), maximize=True).state_dict())
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):  # torch.optim.Adam's L2 weight decay
        FusedAdamW(params()).load_state_dict(torch.optim.Adam(params(), weight_decay=0.1).state_dict())
    # Without weight decay Adam and AdamW are the same: loaded, and decoupled from then on, as torch.optim.AdamW does.
    opt = FusedAdamW(params())
    opt.load_state_dict(torch.optim.Adam(params(), weight_decay=0.0).state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_dtypes_without_a_kernel_are_refused_by_name(dtype: torch.dtype) -> None:
    """fp64 and complex params (the moments are fp32, the kernels load fp32/fp16/bf16) raise on every backend, naming
    the param and the way out, instead of an error from inside the norm."""
    ps = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, dtype=dtype))]
    opt = FusedAdamW(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match=f"param 1 of param group 0 is {dtype}.*torch.optim.AdamW"):
        opt.step()


@pytest.mark.parametrize("option", [{"lr": -1.0}, {"lr": float("nan")}, {"lr": torch.tensor(float("inf"))},
                                    {"lr": torch.ones(2)}, {"eps": float("nan")}, {"eps": -1e-8},
                                    {"weight_decay": float("inf")}, {"max_grad_norm": float("nan")},
                                    {"max_grad_norm": 0.0}, {"betas": (0.9, 1.0)}])
def test_invalid_hyperparameters_are_refused(option: dict[str, Any]) -> None:
    """As torch.optim.AdamW refuses a negative lr or eps; NaN and inf too, which would silently NaN every param."""
    with pytest.raises(ValueError, match=next(iter(option))):
        FusedAdamW(params(), **option)


def test_load_takes_a_numeric_step_and_refuses_moments_of_another_shape() -> None:
    """State dicts of older torch versions hold ``step`` as a number; moments of another shape (another model's
    state dict) are refused, not broadcast into the param's shape."""
    ps = params()
    torch_opt = torch.optim.AdamW(ps)
    steps(torch_opt, ps, count=2)
    saved = copy.deepcopy(torch_opt.state_dict())
    saved["state"][0]["step"] = 2.0
    opt = FusedAdamW(ps)
    opt.load_state_dict(saved)
    assert opt.state[ps[0]]["step"].dtype == torch.float32 and opt.state[ps[0]]["step"].item() == 2.0
    torch.testing.assert_close(opt.state[ps[0]]["exp_avg"], torch_opt.state[ps[0]]["exp_avg"], rtol=0, atol=0)
    saved["state"][1]["exp_avg_sq"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of param 1 has shape \[1\], the param \[3\]"):
        FusedAdamW(ps).load_state_dict(saved)
