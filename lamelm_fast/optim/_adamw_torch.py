"""The pure-PyTorch FusedAdamW backend: the test oracle and the CPU path.

Foreach ops per (bucket, param group, device), over flat pieces of the tensors so that temporaries stay small; the
norm, the clip coefficient and the "is the step finite" decision stay 0-dim device tensors, so there is no host
sync. A skipped step commits nothing: every write selects between the candidate and the old value with
``torch.where`` (blending with a 0/1 factor would let NaN through). On CPU, fp32 buckets without a master copy or
stochastic rounding are updated by torch's fused AdamW kernel instead, its ``found_inf`` being the skip
(:func:`_fused_applies`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lamelm_fast.optim._adamw_work import Bucket, BucketKey, StepTensors

_MASK32 = 0xFFFFFFFF


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    """``1 - beta**step`` computed as ``-expm1(step * log(beta))``.

    In fp32 the direct form loses ~1e-5 relative for beta2=0.999 at small steps (beta rounds to fp32,
    then cancels against 1); this form stays within fp32 rounding of the float64 value.
    """
    if beta == 0.0:
        return torch.ones_like(step)
    return -torch.expm1(step * math.log(beta))


def _mix32(x: Tensor) -> Tensor:
    """The 32-bit hash of the Triton and CUDA kernels, on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32  # int64 products wrap; their low 32 bits are the uint32 product
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stochastic_round_bf16(value: Tensor, seed: int, param_id: int, step: Tensor, first_index: int = 0) -> Tensor:
    """fp32 ``value`` rounded to bf16 up with probability equal to the discarded fraction (unbiased).

    Draws the same bits as the kernels: noise = hash(element index ^ key), key = hash(seed ^ hash(id ^ hash(step))),
    the element index counting from ``first_index`` (where ``value`` is a piece of a larger tensor).
    """
    key = _mix32(seed ^ _mix32(param_id ^ _mix32(step.to(torch.int64) & _MASK32)))
    index = torch.arange(first_index, first_index + value.numel(), device=value.device).view(value.shape)
    noise = _mix32((index & _MASK32) ^ key) & 0xFFFF  # the kernels hash the index's low 32 bits
    bits = ((value.view(torch.int32).to(torch.int64) & _MASK32) + noise) & 0xFFFF0000
    # Back to int32 two's complement; the result has no bits below bf16's mantissa, so the cast to bf16 is exact.
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).to(torch.bfloat16)


def _commit(dst: Tensor, new: Tensor, apply: Tensor) -> None:
    """``dst = new`` where ``apply`` (0-dim bool), else ``dst`` is left bitwise as it was; no host read."""
    torch.where(apply, new.to(dst.dtype), dst, out=dst)


class TorchAdamW:
    """Backend protocol: ``sum_squares`` -> ``finalize`` -> ``update``, as the Triton and CUDA backends."""

    def sum_squares(self, work: StepTensors, buckets: list[Bucket]) -> tuple[Tensor, list[tuple[int, int]]]:
        """One fp32 sum of squares per bucket, and each bucket's slice of that vector."""
        sums = []
        for bucket in buckets:
            grads = [work.grads[i] for i in bucket.indices]
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            # The norm of the per-tensor norms, as clip_grad_norm_ computes it (sqrt of its square is exact).
            sums.append(torch.linalg.vector_norm(torch.stack([n.to(work.device) for n in norms])).square())
        return torch.stack(sums), [(i, i + 1) for i in range(len(buckets))]

    def finalize(self, work: StepTensors, squares: Tensor, skipped: Tensor) -> Tensor:
        norm = squares.sum().sqrt()
        finite = torch.isfinite(norm)
        skipped += (~finite).to(skipped.device)
        increment = finite.to(torch.float32)
        for step in work.steps:  # not _foreach_add_(steps, tensor): on CPU that reads the tensor on the host
            step.add_(increment.to(step.device))
        return norm

    def update(self, work: StepTensors, buckets: list[Bucket], param_groups: list[dict[str, Any]], norm: Tensor,
               seed: int) -> None:
        for bucket in buckets:
            by_group: dict[tuple[int, torch.device], list[int]] = {}
            for i in bucket.indices:
                by_group.setdefault((work.groups[i], work.params[i].device), []).append(i)
            for (group_index, device), indices in by_group.items():
                group = param_groups[group_index]
                clip = None
                if group["max_grad_norm"] is not None:
                    # Same formula as clip_grad_norm_; clamping (not branching) avoids a host sync.
                    clip = torch.clamp(group["max_grad_norm"] / (norm.to(device) + 1e-6), max=1.0)
                finite = torch.isfinite(norm).to(device)
                fused = _fused_applies(bucket.key, device)
                for pieces in _pieces(work, indices):
                    if fused and all(flat for *_, flat in pieces):
                        _fused_update(work, pieces, group, clip, finite)
                    else:
                        _update(work, pieces, group, clip, finite, bucket.key.master, bucket.key.stochastic, seed)


# Elements per batch of the update: bounds the fp32 temporaries of a step (a handful per element) to ~100 MB
# whatever the model size, by cutting contiguous tensors into flat pieces.
_PIECE = 1 << 22


def _pieces(work: StepTensors, indices: list[int]) -> Iterator[list[tuple[int, int, int, bool]]]:
    """Batches of (tensor, start, stop, flat) ranges of at most _PIECE elements (a non-contiguous tensor whole)."""
    batch: list[tuple[int, int, int, bool]] = []
    size = 0
    for i in indices:
        numel = work.params[i].numel()
        tensors = (work.params[i], work.grads[i], work.exp_avgs[i], work.exp_avg_sqs[i], work.masters[i])
        flat = all(t is None or t.is_contiguous() for t in tensors)
        for start in range(0, numel, _PIECE if flat else max(numel, 1)):
            stop = min(start + _PIECE, numel) if flat else numel
            if batch and size + stop - start > _PIECE:
                yield batch
                batch, size = [], 0
            batch.append((i, start, stop, flat))
            size += stop - start
    if batch:
        yield batch


def _piece_views(tensors: list, pieces: list[tuple[int, int, int, bool]]) -> list[Tensor]:
    """The pieces' ranges of ``tensors`` (one of StepTensors' parallel lists): flat slices, or non-contiguous tensors
    whole."""
    return [tensors[i].view(-1)[start:stop] if flat else tensors[i] for i, start, stop, flat in pieces]


def _fused_applies(key: BucketKey, device: torch.device) -> bool:
    """Whether a bucket's update can be torch's own fused AdamW kernel (``aten._fused_adamw_``): on CPU (where the
    foreach ops below run tensor by tensor, each writing a temporary: ~5x the fused kernel's time for the embedded
    default model's full fine-tune), with params, grads and moments in one dtype (fp32: the moments are) and neither
    a master copy nor stochastic rounding, which it does not know. On GPUs the Triton and CUDA backends do this."""
    return (device.type == "cpu" and key.param_dtype == key.grad_dtype == torch.float32 and not key.master
            and not key.stochastic)


def _fused_update(work: StepTensors, pieces: list[tuple[int, int, int, bool]], group: dict[str, Any],
                  clip: Tensor | None, finite: Tensor) -> None:
    """AdamW on contiguous pieces by ``aten._fused_adamw_``: one pass, in place, the same formula as :func:`_update`
    (fp32 arithmetic, bias corrections in fp64). A skipped step is its ``found_inf``: the kernel then returns before
    writing anything (read inside the kernel, not through a host read of ours). The clipped gradients are
    temporaries: its ``grad_scale`` would write them over the caller's gradients."""
    params, grads, exp_avgs, exp_avg_sqs = (_piece_views(tensors, pieces) for tensors in
                                            (work.params, work.grads, work.exp_avgs, work.exp_avg_sqs))
    if clip is not None:
        grads = torch._foreach_mul(grads, clip)
    lr = group["lr"]
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [],
                        [work.steps[i] for i, *_ in pieces], lr=lr.to(finite.device) if isinstance(lr, Tensor) else lr,
                        beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                        eps=group["eps"], amsgrad=False, maximize=False, found_inf=(~finite).to(torch.float32))


def _update(work: StepTensors, pieces: list[tuple[int, int, int, bool]], group: dict[str, Any], clip: Tensor | None,
            finite: Tensor, master: bool, stochastic: bool, seed: int) -> None:
    """AdamW on a batch of pieces with foreach ops; every write selects old or new on ``finite``."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, Tensor):
        lr = lr.to(finite.device)

    params, grads, exp_avgs, exp_avg_sqs = (_piece_views(tensors, pieces) for tensors in
                                            (work.params, work.grads, work.exp_avgs, work.exp_avg_sqs))
    grads = [g.float() for g in grads]
    if clip is not None:  # out of place: for fp32 grads, .float() is p.grad itself, which must not change
        grads = torch._foreach_mul(grads, clip)
    # The step counters were advanced by finalize() (left as they were on a skipped step, whose
    # candidates below may then be inf/NaN: they are never committed).
    steps = torch.stack([work.steps[i] for i, *_ in pieces])
    step_sizes = (lr / _bias_correction(beta1, steps)).unbind()
    bias_correction2_sqrts = _bias_correction(beta2, steps).sqrt().unbind()

    new_exp_avgs = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    new_exp_avg_sqs = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(new_exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(new_exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrts)
    torch._foreach_add_(denoms, eps)
    masters = _piece_views(work.masters, pieces) if master else None
    weights = masters if masters is not None else [p.float() for p in params]
    # Decoupled weight decay acts on the pre-update weights, as in torch.optim.AdamW.
    new_weights = torch._foreach_mul(weights, 1 - lr * weight_decay)
    updates = torch._foreach_div(new_exp_avgs, denoms)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_sub_(new_weights, updates)

    for k, (i, start, _, _) in enumerate(pieces):
        _commit(exp_avgs[k], new_exp_avgs[k], finite)
        _commit(exp_avg_sqs[k], new_exp_avg_sqs[k], finite)
        if masters is not None:
            _commit(masters[k], new_weights[k], finite)
        new_param = new_weights[k]
        if stochastic:
            new_param = stochastic_round_bf16(new_param, seed, work.param_ids[i], work.steps[i], start)
        _commit(params[k], new_param, finite)
