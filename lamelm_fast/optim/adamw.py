"""AdamW with global grad-norm clipping and on-device non-finite skipping, as one optimizer step.

``step()`` never synchronises with the host: the global norm, the clip coefficient and the "was the step finite"
decision stay on the device. The work runs on one of three backends picked by ``lamelm_fast.ops.dispatch``
(``LAMELM_KERNELS`` / ``set_backend``): the CUDA extension (csrc/adamw.cu), Triton (kernels/adamw.py) or the
torch reference (CPU path and test oracle); all three share this class's state and semantics. The CUDA and Triton
kernels read the same device tables (_adamw_tables.py), so either takes 3 launches per step (one bucket) whatever
the number of tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain, compress, repeat
from operator import attrgetter, is_
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lamelm_fast.ops.dispatch import BackendUnavailable, requested_backend, resolve_backend
from lamelm_fast.optim._adamw_torch import TorchAdamW
from lamelm_fast.optim._adamw_work import SUPPORTED_DTYPES, Bucket, BucketKey, StepTensors

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5 or a build without distributed support
    DTensor = None

# Per-param state keys of torch.optim.AdamW, so that state dicts are interchangeable; "master_param" (the fp32
# copy of a low-precision param, with master_weights=True) is ours and torch.optim.AdamW ignores it.
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
_MASTER = "master_param"
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", _MASTER)  # the state entries with the param's shape
_OUR_GROUP_KEYS = ("max_grad_norm", "master_weights", "stochastic_rounding")
# torch.optim.AdamW's other group options, at its defaults: our param groups (and so our state dicts) carry the same
# keys as its, and its constructor's keyword arguments are accepted. foreach, fused and capturable only choose torch's
# implementation (FusedAdamW has its own fused, sync-free step): any value is accepted, kept in the groups (a state
# dict loaded into torch.optim.AdamW gets them back) and otherwise ignored. decoupled_weight_decay is not an argument
# of torch.optim.AdamW either: its groups always say True.
_TORCH_GROUP_DEFAULTS: dict[str, Any] = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                                         "differentiable": False, "fused": None, "decoupled_weight_decay": True}
# The options of torch.optim.AdamW that change the math, which FusedAdamW does not implement: (the option as the
# error names it, whether a group asks for it, what to do instead).
_UNSUPPORTED: tuple[tuple[str, Callable[[dict[str, Any]], bool], str], ...] = (
    ("amsgrad=True", lambda group: bool(group.get("amsgrad")),
     "use torch.optim.AdamW(amsgrad=True), after torch.nn.utils.clip_grad_norm_ for clipping"),
    ("maximize=True", lambda group: bool(group.get("maximize")),
     "minimize the negated objective instead (or use torch.optim.AdamW(maximize=True))"),
    ("differentiable=True", lambda group: bool(group.get("differentiable")),
     "its step runs under no_grad; use torch.optim.AdamW(differentiable=True)"),
    # (torch.optim.Adam's L2 penalty; without weight decay the two are the same, and load as torch.optim.AdamW does)
    ("decoupled_weight_decay=False with weight_decay != 0",
     lambda group: group.get("decoupled_weight_decay") is False and group.get("weight_decay", 0) != 0,
     "its weight decay is AdamW's (decoupled); use torch.optim.Adam for L2 weight decay"),
)


def _refuse_unsupported(group: dict[str, Any], action: str) -> None:
    """ValueError naming the first option of ``group`` that FusedAdamW does not implement, and the way out."""
    for option, asks, instead in _UNSUPPORTED:
        if asks(group):
            raise ValueError(f"FusedAdamW cannot {action} {option}: {instead}")


def _rounds_to(master: Tensor, param: Tensor) -> bool:
    """Whether ``param`` is the fp32 ``master`` rounded to the param's dtype: to nearest, or for bf16 either way (what
    stochastic rounding may give), i.e. the master's bits truncated to bf16 or the next bf16 away from zero."""
    if param.dtype == torch.bfloat16:
        toward_zero = master.view(torch.int32) & ~0xFFFF
        bits = param.float().view(torch.int32)
        return bool(((bits == toward_zero) | (bits == toward_zero + 0x10000)).all())
    return torch.equal(master.to(param.dtype), param)


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), else the tensor itself."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def _reduction_domain(grad: Tensor) -> tuple[Any, ...]:
    """Process groups over which this gradient's squared norm must be summed.

    Plain tensors (DDP: already all-reduced, identical on every rank) and replicated DTensor dims need none;
    each sharded mesh dim of a DTensor (FSDP2) needs a sum of the local squares over that dim's group.
    """
    if DTensor is None or not isinstance(grad, DTensor):
        return ()
    groups = []
    for mesh_dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise ValueError("FusedAdamW got a gradient with a Partial placement: reduce it before the step")
        if placement.is_shard():
            groups.append(grad.device_mesh.get_group(mesh_dim))
    return tuple(groups)


def _global_squares(partials: Tensor, slices: list[tuple[int, int]], buckets: list[Bucket]) -> Tensor:
    """Partial sums of squares whose total is the global squared norm (``partials`` itself without sharding)."""
    by_domain: dict[tuple[Any, ...], list[Tensor]] = {}
    for (begin, end), bucket in zip(slices, buckets, strict=True):
        by_domain.setdefault(bucket.key.domain, []).append(partials[begin:end])
    if list(by_domain) == [()]:
        return partials
    totals = []
    for domain, parts in by_domain.items():  # same order on every rank: it follows the param order
        total = torch.cat(parts).sum()
        for group in domain:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        totals.append(total)
    return torch.stack(totals)


def _check_param(param: Tensor, grad: Tensor, state: dict[str, Tensor], group_index: int, index: int) -> None:
    """What every backend assumes of a param, its gradient and its state; checked when the step's plan is built (a
    new param, a replaced ``.data``, a loaded state), not every step."""
    where = f"param {index} of param group {group_index}"
    if param.dtype not in SUPPORTED_DTYPES or grad.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"FusedAdamW supports fp32, fp16 and bf16 params and gradients; {where} is {param.dtype} "
                        f"with a {grad.dtype} gradient. Cast the model (model.float()), or use torch.optim.AdamW for "
                        "float64 or complex params")
    for key in _PARAM_SHAPED:
        if key in state and state[key].shape != param.shape:
            raise RuntimeError(f"FusedAdamW: {where} has shape {list(param.shape)} but its optimizer state {key!r} "
                               f"has shape {list(state[key].shape)}: the param's .data was replaced by a tensor of "
                               "another shape after a step. Restart its moments (del optimizer.state[param]) or build "
                               "a new optimizer")


_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_DATA_PTR = Tensor.data_ptr
_NUMEL = Tensor.numel
_IS_CONTIGUOUS = Tensor.is_contiguous


class _GroupPlan:
    """What one param group looked like when the plan was made."""

    __slots__ = ("params", "options", "param_ptrs", "present", "absent", "grad_dtypes", "grad_numels")

    def __init__(self, group: dict[str, Any], present: list[bool], grad_dtypes: list[torch.dtype],
                 grad_numels: list[int]) -> None:
        self.params: list[Tensor] = group["params"]
        self.options = (group["master_weights"], group["stochastic_rounding"])
        self.param_ptrs = list(map(_DATA_PTR, self.params))  # a param whose .data was replaced moves
        # Selectors of the params that had a gradient and of those that had none (None when all had one).
        self.present = None if all(present) else present
        self.absent = None if all(present) else [not p for p in present]
        self.grad_dtypes, self.grad_numels = grad_dtypes, grad_numels


class _StepPlan:
    """The last step's `StepTensors` and buckets, re-used while only the gradient tensors changed.

    ``refresh`` reads what can change between steps (each param's data pointer and gradient; each gradient's
    pointer, dtype, numel and contiguity; the param lists, group switches and the state dict) with C-level passes
    over the param lists, and returns None on any difference, so that the step rebuilds everything. State changes
    the optimizer makes itself (load_state_dict, add_param_group, new state) drop the plan explicitly or change
    ``len(state)``.
    """

    __slots__ = ("work", "buckets", "state", "state_len", "groups")

    def __init__(self, work: StepTensors, buckets: list[Bucket], state: dict, groups: list[_GroupPlan]) -> None:
        self.work, self.buckets, self.groups = work, buckets, groups
        self.state, self.state_len = state, len(state)

    def refresh(self, param_groups: list[dict[str, Any]], state: dict) -> StepTensors | None:
        if state is not self.state or len(state) != self.state_len or len(param_groups) != len(self.groups):
            return None
        grads: list[Tensor] = []
        ptrs: list[int] = []
        for group, plan in zip(param_groups, self.groups, strict=True):
            params = group["params"]
            if (params is not plan.params or (group["master_weights"], group["stochastic_rounding"]) != plan.options
                    or list(map(_DATA_PTR, params)) != plan.param_ptrs):
                return None
            group_grads = list(map(_GRAD, params))
            if plan.present is not None:
                if not all(map(is_, compress(group_grads, plan.absent), repeat(None))):
                    return None  # a param without a gradient got one
                group_grads = list(compress(group_grads, plan.present))
            try:
                group_ptrs = list(map(_DATA_PTR, group_grads))
            except (TypeError, RuntimeError):  # a gradient is gone (None), or has no storage (sparse)
                return None
            if (list(map(_DTYPE, group_grads)) != plan.grad_dtypes or list(map(_NUMEL, group_grads)) != plan.grad_numels
                    or not all(map(_IS_CONTIGUOUS, group_grads))):
                return None
            grads += group_grads
            ptrs += group_ptrs
        self.work.grads, self.work.grad_ptrs = grads, ptrs
        return self.work


def _backend_class(name: str) -> type:
    if name == "triton":
        from lamelm_fast.optim._adamw_triton import TritonAdamW

        return TritonAdamW
    if name == "cuda":
        from lamelm_fast.optim._adamw_cuda import CudaAdamW

        return CudaAdamW
    return TorchAdamW


class FusedAdamW(torch.optim.Optimizer):
    """AdamW + global grad-norm clipping + skipping of non-finite steps, with no host sync in ``step``.

    Equals ``clip_grad_norm_(params, max_grad_norm)`` followed by ``torch.optim.AdamW.step()`` (to fp32 rounding).
    After each ``step()``:

    * ``grad_norm`` is the fp32 global L2 norm of all gradients before clipping (0-dim device tensor), global
      across ranks when gradients are sharded DTensors (FSDP2).
    * ``skipped_steps`` (0-dim int64 device tensor, saved in the state dict) counts steps whose norm was NaN/inf;
      such steps leave parameters and state bitwise unchanged.

    Gradients (``p.grad``) are never modified: clipping is applied in registers. State is fp32 whatever the param
    dtype, with torch.optim.AdamW's keys, so state dicts load both ways. Per-group options:

    * ``master_weights``: keep an fp32 copy of bf16/fp16 params (state ``"master_param"``); the update is computed
      on it and written back to the param, rounded, in the same pass.
    * ``stochastic_rounding``: round the written bf16 param stochastically (unbiased); ``seed`` fixes the bits.

    torch.optim.AdamW's keyword arguments are accepted (keyword-only here: the 6th positional is ``max_grad_norm``)
    and kept in the param groups, whose keys are torch's plus ours. ``foreach``, ``fused`` and ``capturable`` only
    choose torch's implementation and are ignored: the step is always fused and never syncs with the host.
    ``amsgrad=True``, ``maximize=True`` and ``differentiable=True`` are not implemented and raise ValueError.

    The per-step host work is small because a step re-uses the last one's bookkeeping (state lookups, buckets,
    device tables) while only the gradients changed: it checks every param's data pointer and every gradient's
    pointer, dtype, numel and contiguity, and rebuilds on any change (``.data`` replaced, gradients appearing or
    going, load_state_dict, add_param_group, group switches). State tensors swapped by hand for other tensors
    (``opt.state[p]["exp_avg"] = t``) are not noticed: load state with ``load_state_dict``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
        *,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # The 6th positional argument of torch.optim.AdamW is amsgrad: a ported positional True must not clip at 1.0.
        if isinstance(max_grad_norm, bool):
            raise TypeError(f"max_grad_norm must be a float or None, got {max_grad_norm} (torch.optim.AdamW's 6th "
                            "positional argument is amsgrad; FusedAdamW's is max_grad_norm: pass amsgrad by keyword)")
        # Written so that NaN fails too.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element, got shape {list(lr.shape)}")
        if not 0.0 <= float(lr) < float("inf"):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0.0 <= eps < float("inf") or not 0.0 <= weight_decay < float("inf"):
            raise ValueError(f"eps and weight_decay must be finite numbers >= 0, got eps={eps}, "
                             f"weight_decay={weight_decay}")
        if max_grad_norm is not None and not 0.0 < max_grad_norm < float("inf"):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
            **_TORCH_GROUP_DEFAULTS,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
        }
        self._plan: _StepPlan | None = None
        super().__init__(params, defaults)
        self.grad_norm: Tensor | None = None
        first = next((p for group in self.param_groups for p in group["params"]), None)
        device = torch.device("cpu") if first is None else _local(first).device
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        # Drawn from torch's global RNG, so torch.manual_seed makes stochastic rounding reproducible.
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        self._backends: dict[str, Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups loaded from a torch.optim.AdamW state dict have none of our keys, and ours from before the torch keys
        # were added have none of those; decoupled weight decay always, as torch.optim.AdamW.__setstate__ has it.
        fallback = {**_TORCH_GROUP_DEFAULTS, **self.defaults}  # (defaults unpickled from before the torch keys)
        for group in self.param_groups:
            for key in (*_OUR_GROUP_KEYS, *_TORCH_GROUP_DEFAULTS):
                group.setdefault(key, fallback[key])
            group["decoupled_weight_decay"] = True
        self._plan = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Before the group is added (torch fills in the defaults as it adds it); the constructor's options too.
        _refuse_unsupported({**self.defaults, **param_group}, "run with")
        super().add_param_group(param_group)
        self._plan = None

    def _init_state(self, param: Tensor, state: dict[str, Tensor]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=_local(param).device)
        state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)

    def _collect(self) -> tuple[StepTensors, list[Bucket]] | None:
        """Local tensors of every param with a gradient, and their buckets; None if no param has a gradient.

        Runs every step over every param (hundreds for LoRA): while only the gradient tensors changed since the
        last step, the last step's tensors and buckets are re-used (`_StepPlan`); else they are rebuilt here.
        """
        plan = self._plan
        if plan is not None:
            work = plan.refresh(self.param_groups, self.state)
            if work is not None:
                return work, plan.buckets
        self._plan = None
        work: StepTensors | None = None
        buckets: dict[tuple, list[int]] = {}
        group_plans: list[_GroupPlan] = []
        cacheable = True  # DTensors and gradients made contiguous here are rebuilt every step
        param_id = -1
        for group_index, group in enumerate(self.param_groups):
            use_master, use_stochastic = group["master_weights"], group["stochastic_rounding"]
            present, grad_dtypes, grad_numels = [], [], []
            for param in group["params"]:
                param_id += 1
                grad = param.grad
                present.append(grad is not None)
                if DTensor is not None and isinstance(param, DTensor):
                    cacheable = False
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                grad_dtypes.append(grad.dtype)
                grad_numels.append(grad.numel())
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                _check_param(param, grad, state, group_index, len(present) - 1)
                dtype = param.dtype
                master = None
                if use_master and dtype != torch.float32:
                    if _MASTER not in state:
                        state[_MASTER] = param.detach().to(torch.float32, copy=True)
                    master = state[_MASTER]
                stochastic = use_stochastic and dtype != torch.float32
                if stochastic and dtype != torch.bfloat16:
                    raise ValueError(f"stochastic_rounding supports bf16 params only, got {dtype}")
                exp_avg, exp_avg_sq, domain = state["exp_avg"], state["exp_avg_sq"], ()
                if DTensor is not None and isinstance(param, DTensor):
                    domain = _reduction_domain(grad)
                    param, grad, exp_avg, exp_avg_sq = (t.to_local() for t in (param, grad, exp_avg, exp_avg_sq))
                    master = None if master is None else master.to_local()
                if not grad.is_contiguous():
                    cacheable = False
                    if param.is_contiguous():
                        grad = grad.contiguous()
                if work is None:
                    work = StepTensors(param.device)
                elif param.device != work.device:
                    work.single_device = False
                buckets.setdefault((dtype, grad.dtype, master is not None, stochastic, domain), []).append(
                    len(work.params))
                work.params.append(param)
                work.grads.append(grad)
                work.grad_ptrs.append(grad.data_ptr())
                work.exp_avgs.append(exp_avg)
                work.exp_avg_sqs.append(exp_avg_sq)
                work.masters.append(master)
                work.steps.append(state["step"])
                work.groups.append(group_index)
                work.param_ids.append(param_id)
            if cacheable:
                group_plans.append(_GroupPlan(group, present, grad_dtypes, grad_numels))
        if work is None:
            return None
        bucket_list = [Bucket(BucketKey(*key), tuple(indices)) for key, indices in buckets.items()]
        if cacheable:
            self._plan = _StepPlan(work, bucket_list, self.state, group_plans)
        return work, bucket_list

    def _backend(self, work: StepTensors) -> Any:
        name = resolve_backend(work.device, has_cuda=True)
        if name != "torch" and not work.single_device:
            if requested_backend() != "auto":
                raise BackendUnavailable(f"the {name} FusedAdamW backend needs all parameters on one device")
            name = "torch"
        if name not in self._backends:
            self._backends[name] = _backend_class(name)()
        return self._backends[name]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = self._collect()
        if collected is None:  # no gradients: nothing to update, and a norm of 0 (clip_grad_norm_'s answer)
            self.grad_norm = torch.zeros((), device=self.skipped_steps.device)
            return loss
        work, buckets = collected
        if self.skipped_steps.device != work.device:  # the model moved after the optimizer was built: once only
            self.skipped_steps = self.skipped_steps.to(work.device)
        try:
            backend = self._backend(work)
            partials, slices = backend.sum_squares(work, buckets)
            squares = _global_squares(partials, slices, buckets)
            norm = backend.finalize(work, squares, self.skipped_steps)
            backend.update(work, buckets, self.param_groups, norm, self.seed)
            # The kernels write the params through pointers, which autograd does not see: bump their versions as
            # torch.optim.AdamW's in-place ops do (a graph saved before the step then refuses to run backward).
            torch.autograd.graph.increment_version(work.params)
        finally:
            work.grads = []  # the plan keeps `work` until the next step: it must not keep the gradients alive
        self.grad_norm = norm
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps.clone()
        state["seed"] = self.seed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a FusedAdamW or torch.optim.AdamW state dict (not one saved with amsgrad, maximize, differentiable or
        torch.optim.Adam's L2 weight decay: see ``_UNSUPPORTED``)."""
        for group in state_dict["param_groups"]:
            _refuse_unsupported(group, "load state saved with")
        super().load_state_dict(state_dict)
        # torch casts the moments to the param dtype (lossy for bf16 params) and keeps `step` on the CPU.
        # Re-take them from the saved dict as fresh fp32 tensors on the param's device instead.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved:
                for key in _PARAM_SHAPED:  # copy_ below would broadcast a wrong shape silently
                    if key in saved and saved[key].shape != param.shape:
                        raise ValueError(f"FusedAdamW.load_state_dict: the saved state {key!r} of param {saved_id} "
                                         f"has shape {list(saved[key].shape)}, the param {list(param.shape)}: the "
                                         "state dict belongs to another model or another order of params")
                # Moments and master copy take the param's layout (the kernels walk them in the param's order).
                self.state[param] = state = {
                    key: torch.empty_like(param, dtype=torch.float32).copy_(saved[key]) if key != "step"
                    # (a number in state dicts of older torch versions)
                    else torch.as_tensor(saved[key]).to(device=_local(param).device, dtype=torch.float32, copy=True)
                    for key in (*_STATE_KEYS, _MASTER) if key in saved
                }
                if _MASTER in state and not _rounds_to(_local(state[_MASTER]), _local(param)):
                    # Stale: the param moved without it (steps of torch.optim.AdamW, which carries our master copy
                    # in its state but never updates it). The param is the truth; the next step re-seeds the master.
                    del state[_MASTER]
        # A torch.optim.AdamW state dict has no skip count: it starts at 0, as on a fresh FusedAdamW.
        self.skipped_steps.copy_(state_dict.get("skipped_steps", torch.zeros((), dtype=torch.int64)))
        self.seed = state_dict.get("seed", self.seed)
        self._plan = None  # the state tensors were replaced
