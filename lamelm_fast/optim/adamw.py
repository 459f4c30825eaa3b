"""AdamW with global-norm clipping and on-device non-finite skipping, as one optimizer step.

This is the pure-PyTorch reference (and the CPU path). It never synchronises with the host inside
``step()``: the global norm, the clip coefficient and the "was the step finite" decision all stay
0-dim device tensors, so the step can later be replaced by fused kernels or captured in a graph.
"""

import math
from collections import defaultdict
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

# Per-param state keys, identical to torch.optim.AdamW so that state dicts are interchangeable.
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _global_grad_norm(grads: list[Tensor]) -> Tensor:
    """fp32 L2 norm of all ``grads`` viewed as one vector, computed like ``clip_grad_norm_``.

    One ``_foreach_norm`` per (device, dtype) bucket, then the norm of the stacked per-tensor norms,
    on the device of the first gradient.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for grad in grads:
        buckets[(grad.device, grad.dtype)].append(grad)
    device = grads[0].device
    norms = [
        norm.to(device)
        for bucket in buckets.values()
        for norm in torch._foreach_norm(bucket, 2.0, dtype=torch.float32)
    ]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    """``1 - beta**step`` computed as ``-expm1(step * log(beta))``.

    In fp32 the direct form loses ~1e-5 relative for beta2=0.999 at small steps (beta rounds to fp32,
    then cancels against 1); this form stays within fp32 rounding of the float64 value.
    """
    if beta == 0.0:
        return torch.ones_like(step)
    return -torch.expm1(step * math.log(beta))


def _commit(dst: Tensor, new: Tensor, apply: Tensor) -> None:
    """``dst = new`` where ``apply`` (0-dim bool) is True, else leave ``dst`` bitwise unchanged.

    Selecting (instead of blending with a 0/1 factor) is what keeps NaN/inf candidates out.
    """
    dst.copy_(torch.where(apply, new.to(dst.dtype), dst))


def _adamw_update(
    param: Tensor,
    state: dict[str, Tensor],
    grad: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    apply: Tensor,
) -> None:
    """One AdamW step for one parameter in fp32, committed only where ``apply`` is True."""
    # The candidate step is always >= 1, so the bias corrections below never divide by zero;
    # a skipped step simply does not commit it.
    step = state["step"] + 1
    bias_correction1 = _bias_correction(beta1, step)
    bias_correction2 = _bias_correction(beta2, step)
    exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(eps)
    # Decoupled weight decay acts on the pre-update weights, as in torch.optim.AdamW.
    new_param = param.float() * (1 - lr * weight_decay) - exp_avg / denom * (lr / bias_correction1)

    _commit(state["step"], step, apply)
    _commit(state["exp_avg"], exp_avg, apply)
    _commit(state["exp_avg_sq"], exp_avg_sq, apply)
    _commit(param, new_param, apply)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW + global grad-norm clipping + skipping of non-finite steps, with no host sync in ``step``.

    After each ``step()``:

    * ``grad_norm`` is the fp32 global L2 norm of all gradients before clipping (0-dim device tensor).
    * ``skipped_steps`` (0-dim int64 device tensor) counts steps whose norm was NaN/inf; such steps leave
      parameters and state unchanged.

    Gradients (``p.grad``) are never modified: clipping is applied to the fp32 copy used by the update.
    State is fp32 whatever the parameter dtype, and uses torch.optim.AdamW's keys, so state dicts load
    both ways.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
    ) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")
        if max_grad_norm is not None and max_grad_norm <= 0.0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
        }
        super().__init__(params, defaults)
        self.grad_norm: Tensor | None = None
        device = self.param_groups[0]["params"][0].device
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups loaded from a torch.optim.AdamW state dict have no max_grad_norm.
        for group in self.param_groups:
            group.setdefault("max_grad_norm", self.defaults["max_grad_norm"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        if any(grad.is_sparse for grad in grads):
            raise RuntimeError("FusedAdamW does not support sparse gradients")

        norm = _global_grad_norm(grads)
        finite = torch.isfinite(norm)
        self.grad_norm = norm
        self.skipped_steps += (~finite).to(self.skipped_steps.device)

        for group in self.param_groups:
            clip_coef = None
            if group["max_grad_norm"] is not None:
                # Same formula as clip_grad_norm_; clamping (not branching) avoids a host sync.
                clip_coef = torch.clamp(group["max_grad_norm"] / (norm + 1e-6), max=1.0)
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                grad = param.grad.float()
                if clip_coef is not None:
                    grad = grad * clip_coef.to(param.device)
                _adamw_update(
                    param,
                    state,
                    grad,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    apply=finite.to(param.device),
                )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a FusedAdamW or torch.optim.AdamW state dict (amsgrad/maximize are not supported)."""
        for group in state_dict["param_groups"]:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("FusedAdamW cannot load state saved with amsgrad=True or maximize=True")
        super().load_state_dict(state_dict)
        # torch casts the moments to the param dtype (lossy for bf16 params) and keeps `step` on the CPU.
        # Re-take them from the saved dict as fresh fp32 tensors on the param's device instead.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved:
                self.state[param] = {
                    key: saved[key].to(device=param.device, dtype=torch.float32, copy=True)
                    for key in _STATE_KEYS
                }
