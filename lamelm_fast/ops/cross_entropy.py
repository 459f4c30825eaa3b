"""Fused linear + cross-entropy: the autograd Function, its torch reference and its Triton dispatch.

Both backends walk over chunks of rows: for each chunk the logits come from one matmul (cuBLAS on GPU), then the
loss and, when gradients are wanted, d loss / d logits are computed in one pass, folded straight into the
gradients of hidden / weight / bias, and the chunk is dropped, so the N x V logits never exist. The gradients
are complete at the end of the forward pass; backward only scales them by grad_output (free when it is 1).

- ``torch`` (the CPU path and the test oracle): the per-chunk math in torch ops, in fp32 (fp64 for fp64 inputs).
- ``triton`` (GPU, or CPU under TRITON_INTERPRET=1): lamelm_fast.kernels.cross_entropy does the per-row pass in
  one program (online logsumexp in fp32, gradient written over the logits in place), so a chunk needs a single
  buffer in the input dtype. fp64 inputs always take the reference.

grad_weight is accumulated over chunks in fp32 for bf16/fp16 inputs. Nothing here reads tensor values on the
host, so it never forces a device sync. Under torch.compile the op runs in eager, as it is (one graph break).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from lamelm_fast.ops.dispatch import resolve_backend

__all__ = ["LinearCrossEntropyLoss", "fused_linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_CPU_CHUNK_BYTES = 64 * 2**20
_CUDA_CHUNK_BYTES_CAP = 2**30
_CUDA_FREE_MEMORY_FRACTION = 8
# torch >= 2.8 has addmm with an output dtype wider than its inputs (CUDA only).
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


@dataclass(frozen=True)
class _LossConfig:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    logit_scale: float


class _PassResult(NamedTuple):
    losses: torch.Tensor  # [N] per-token losses in the compute dtype, 0 at ignored rows
    num_correct: torch.Tensor | None  # 0-dim int64, only when accuracy was asked for
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 so the reference can be checked to ~1e-10; bf16/fp16/fp32 all do their math in fp32.
    return torch.promote_types(dtype, torch.float32)


def _default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                        backend: str = "torch", weight_grad_hidden: int = 0) -> int:
    """Rows per chunk such that one chunk of logits plus its gradient fits the memory budget.

    ``weight_grad_hidden``: the hidden size when the weight needs a gradient (0 otherwise). With 16-bit inputs on
    the Triton path several chunks need a [vocab, hidden] fp32 accumulator, one chunk none (_chunked_pass): all
    rows go in one chunk when its logits take no more than the budget plus that accumulator, so the single chunk
    never holds more memory than the chunked alternative, and moves less.
    """
    compute_dtype = _compute_dtype(dtype)
    if backend == "triton":
        row_bytes = vocab * dtype.itemsize  # the kernel overwrites the logits with their gradient
    else:
        # Live per row: the fp32 logits and their gradient, plus the matmul output when it is narrower.
        row_bytes = 2 * vocab * compute_dtype.itemsize
        if dtype != compute_dtype:
            row_bytes += vocab * dtype.itemsize
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(free_bytes // _CUDA_FREE_MEMORY_FRACTION, _CUDA_CHUNK_BYTES_CAP)
    else:
        budget = _CPU_CHUNK_BYTES
    accumulator_bytes = vocab * weight_grad_hidden * compute_dtype.itemsize if dtype != compute_dtype else 0
    if backend == "triton" and n_rows * row_bytes <= budget + accumulator_bytes:
        return max(1, n_rows)
    rows = budget // row_bytes
    if rows >= n_rows:  # all rows fit: one chunk (rounding it down would leave a sliver for a second one)
        return max(1, n_rows)
    # Multiples of 8 keep the matmul shapes friendly to tensor cores and vectorised CPU kernels.
    return rows - rows % 8 if rows > 8 else max(1, rows)


def _chunk_loss_and_dlogits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: _LossConfig,
    row_scale: torch.Tensor | None,
    want_correct: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses of one chunk, and with `row_scale` the scaled gradient w.r.t. the raw logits.

    `logits` is the fp32 (or fp64) `hidden @ weight.T + bias` of the chunk and is overwritten in place to
    keep at most two chunk-sized buffers alive. `row_scale` is 0-dim or per row.
    """
    valid = labels != cfg.ignore_index
    # Ignored rows still need an in-range index for gather/scatter; their results are masked out.
    safe_labels = labels.masked_fill(~valid, 0)[:, None]
    if cfg.logit_scale != 1.0:
        logits.mul_(cfg.logit_scale)
    if cfg.softcap is not None:
        logits.div_(cfg.softcap).tanh_().mul_(cfg.softcap)

    eps = cfg.label_smoothing
    # (1-eps)*(lse - z_y) + eps*(lse - mean_j z_j), rearranged to avoid a second lse term.
    loss = -(1.0 - eps) * logits.gather(1, safe_labels).squeeze(1)
    if eps:
        loss -= eps * logits.mean(dim=1)
    correct = (logits.argmax(dim=1) == labels) & valid if want_correct else None
    # lse = m + log(sum exp(z - m)) as torch.logsumexp computes it, but with exp(z - m) written over the logits
    # (softcap with a gradient: into a second buffer, its derivative needs them) instead of into a new chunk-sized
    # temporary.
    m = logits.amax(dim=1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)  # rows of -inf (or a +inf) logits: as torch.logsumexp shifts them
    exps = logits - m if cfg.softcap is not None and row_scale is not None else logits.sub_(m)
    sums = exps.exp_().sum(dim=1)
    lse = sums.log() + m.squeeze(1)
    loss += lse
    if cfg.z_loss:
        loss += cfg.z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if row_scale is None:
        return loss, correct, None

    if cfg.softcap is not None:
        # Derivative of c*tanh(z/c) is 1 - tanh^2 = 1 - (z'/c)^2; reuse the logits buffer for it.
        logits.div_(cfg.softcap).square_().neg_().add_(1.0)
    # logit_scale is the chain rule through the pre-cap scaling; ignored rows get exactly zero.
    factor = torch.where(valid, row_scale * cfg.logit_scale, 0.0)
    softmax_factor = factor * (1.0 + 2.0 * cfg.z_loss * lse) if cfg.z_loss else factor  # d(z lse^2) = 2 z lse p
    grad = exps.mul_((softmax_factor / sums)[:, None])  # the softmax and its factor in one pass
    if eps:
        grad.sub_((eps / grad.shape[1] * factor)[:, None])
    grad.scatter_add_(1, safe_labels, ((eps - 1.0) * factor)[:, None].to(grad.dtype))
    if cfg.softcap is not None:
        grad.mul_(logits)
    return loss, correct, grad


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    cfg: _LossConfig,
    chunk_size: int,
    row_scale: torch.Tensor | None,
    needs_grad: tuple[bool, bool, bool],
    want_correct: bool,
    backend: str,
) -> _PassResult:
    """One sweep over the rows: losses, and the gradients in `needs_grad` scaled by `row_scale`."""
    n_rows, hidden_size = hidden.shape
    device = hidden.device
    compute_dtype = _compute_dtype(hidden.dtype)
    need_hidden, need_weight, need_bias = needs_grad if row_scale is not None else (False, False, False)
    use_triton = backend == "triton"
    if use_triton:
        from lamelm_fast.kernels.cross_entropy import cross_entropy_rows

        bias_c = None if bias is None else bias.to(hidden.dtype)  # added by the matmul, in its dtype
    else:
        bias_c = None if bias is None else bias.to(compute_dtype)

    losses = torch.empty(n_rows, dtype=compute_dtype, device=device)
    correct_rows = torch.empty(n_rows, dtype=torch.int32, device=device) if want_correct else None
    grad_hidden = torch.empty(n_rows, hidden_size, dtype=hidden.dtype, device=device) if need_hidden else None
    # Several chunks are summed into an accumulator in the compute dtype, even for bf16 inputs. A single chunk's
    # product is the whole gradient: one GEMM writes it (fp32 accumulation inside cuBLAS, rounded once), with no
    # V x H fp32 buffer, zero fill or conversion pass; it is the common case at a few thousand tokens.
    single_chunk = 0 < n_rows <= chunk_size
    grad_weight = None
    if need_weight and not single_chunk:
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=device)
    grad_bias = torch.zeros(weight.shape[0], dtype=compute_dtype, device=device) if need_bias else None
    any_grad = need_hidden or need_weight or need_bias

    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        hidden_chunk = hidden[start:end]
        chunk_scale = None
        if any_grad:
            chunk_scale = row_scale[start:end] if row_scale.dim() else row_scale
        if use_triton:
            # Logits in the input dtype; the kernel replaces them with their gradient (same dtype) in place.
            logits = (torch.mm(hidden_chunk, weight.t()) if bias_c is None
                      else torch.addmm(bias_c, hidden_chunk, weight.t()))
            cross_entropy_rows(
                logits, labels[start:end], losses[start:end],
                None if correct_rows is None else correct_rows[start:end], chunk_scale,
                ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                logit_scale=cfg.logit_scale, softcap=cfg.softcap)
            dlogits = logits
        else:
            # Matmul in the input dtype (as the kernel does), everything after it in the compute dtype.
            logits = torch.mm(hidden_chunk, weight.t()).to(compute_dtype)
            if bias_c is not None:
                logits += bias_c
            loss, correct, dlogits = _chunk_loss_and_dlogits(
                logits, labels[start:end], cfg, chunk_scale, want_correct
            )
            losses[start:end] = loss
            if correct is not None:
                correct_rows[start:end] = correct
        if need_hidden:
            torch.mm(dlogits.to(hidden.dtype), weight, out=grad_hidden[start:end])
        if need_weight and single_chunk:
            # In the input dtype as grad_hidden is: the torch path's fp32 product would be a V x H fp32 temporary.
            grad_weight = torch.mm(dlogits.t().to(hidden.dtype), hidden_chunk)
        elif need_weight:
            _accumulate_product(grad_weight, dlogits.t(), hidden_chunk)
        if need_bias:
            grad_bias += dlogits.sum(dim=0, dtype=compute_dtype)
        # Freed before the next chunk's matmul allocates (and before grad_weight's conversion after the last): the
        # loop's names would otherwise keep a second chunk of logits alive at the peak.
        del logits, dlogits

    return _PassResult(
        losses,
        None if correct_rows is None else correct_rows.sum(dtype=torch.int64),
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


def _accumulate_product(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``accumulator += left @ right`` with a wider accumulator than the operands and no [V, H] temporary."""
    if left.dtype == accumulator.dtype:
        accumulator.addmm_(left, right.to(accumulator.dtype))
    elif accumulator.is_cuda and _ADDMM_OUT_DTYPE:
        # cuBLAS multiplies bf16/fp16 and accumulates straight into the fp32 buffer.
        torch.addmm(accumulator, left, right, out_dtype=accumulator.dtype, out=accumulator)
    else:
        # Upcasting the chunk-sized operands is cheap; a low-precision product would need a V x H temporary.
        accumulator.addmm_(left.to(accumulator.dtype), right.to(accumulator.dtype))


def _scale_gradients(grads: tuple[torch.Tensor | None, ...], grad_loss: torch.Tensor, backend: str) -> None:
    # In place: an out-of-place multiply would need a second V x H buffer. The Triton kernel reads the scale on
    # the device and skips the tensor when it is 1, which a plain loss.backward() gives, without a host sync.
    if backend == "triton":
        from lamelm_fast.kernels.cross_entropy import scale_inplace

        scale = grad_loss.to(torch.float32)
        for grad in grads:
            if grad is not None:
                scale_inplace(grad, scale)
        return
    for grad in grads:
        if grad is not None:
            grad.mul_(grad_loss)


def _safe_reciprocal(denominator: torch.Tensor) -> torch.Tensor:
    # A zero denominator means nothing to average: the loss and its gradients are 0, never NaN.
    return torch.where(denominator > 0, denominator.reciprocal(), 0.0)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        num_items: torch.Tensor | None,
        cfg: _LossConfig,
        reduction: str,
        chunk_size: int,
        want_accuracy: bool,
        grad_enabled: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute_dtype = _compute_dtype(hidden.dtype)
        num_valid = (labels != cfg.ignore_index).sum()
        # needs_input_grad ignores an enclosing no_grad(), so the caller's grad mode is passed in.
        needs_grad = tuple(grad_enabled and flag for flag in ctx.needs_input_grad[:3])
        ctx.cfg, ctx.reduction, ctx.chunk_size, ctx.backend = cfg, reduction, chunk_size, backend

        if reduction == "none":
            # Per-row grad_output is only known in backward, so the gradients are recomputed there.
            result = _chunked_pass(
                hidden, weight, bias, labels, cfg, chunk_size, None, (False, False, False), want_accuracy, backend
            )
            loss = result.losses
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            if num_items is not None:
                scale = _safe_reciprocal(num_items.to(compute_dtype))
            elif reduction == "mean":
                scale = _safe_reciprocal(num_valid.to(compute_dtype))
            else:
                scale = torch.ones((), dtype=compute_dtype, device=hidden.device)
            row_scale = scale if any(needs_grad) else None
            result = _chunked_pass(
                hidden, weight, bias, labels, cfg, chunk_size, row_scale, needs_grad, want_accuracy, backend
            )
            loss = result.losses.sum() * scale
            # Gradients of an intermediate, not inputs/outputs: kept on ctx so backward can free them.
            ctx.grads = (result.grad_hidden, result.grad_weight, result.grad_bias)

        if want_accuracy:
            accuracy = (result.num_correct / num_valid.clamp_min(1)).to(torch.float32)
        else:
            accuracy = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    @once_differentiable  # the gradients are not functions of a graph: a double backward raises, as torch's own do
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, _grad_accuracy: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            # contiguous: a grad_output broadcast from a scalar has stride 0, the kernel reads one value per row.
            row_scale = grad_loss.to(_compute_dtype(hidden.dtype)).contiguous()
            needs_grad = ctx.needs_input_grad[:3]
            result = _chunked_pass(
                hidden, weight, bias, labels, ctx.cfg, ctx.chunk_size, row_scale, needs_grad, False, ctx.backend
            )
            grads = (result.grad_hidden, result.grad_weight, result.grad_bias)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "fused_linear_cross_entropy: a mean/sum loss supports only one backward (its "
                    "precomputed gradients are scaled in place and released), and this is a second one through "
                    "a graph kept by retain_graph=True or create_graph=True; recompute the loss for each backward "
                    "(double backward, e.g. a gradient penalty, needs F.cross_entropy over full logits)"
                )
            grads, ctx.grads = ctx.grads, None
            _scale_gradients(grads, grad_loss, ctx.backend)
        return (*grads, None, None, None, None, None, None, None, None)


def _validate_options(
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int | None,
) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not (softcap > 0.0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be None or a finite value > 0, got {softcap}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _validate_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    num_items: int | float | torch.Tensor | None,
) -> None:
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating [..., H] tensor, got {hidden.dtype} {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating [V] = [{weight.shape[0]}] tensor, got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"hidden, weight, labels and bias must share a device, got {sorted(map(str, devices))}"
        )
    if num_items is not None:
        if reduction == "none":
            raise ValueError('num_items cannot be combined with reduction="none"')
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(
                    f"num_items must be a number or a 1-element tensor, got {tuple(num_items.shape)}"
                )
        elif not num_items >= 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")


# Opaque to torch.compile (one graph break, at the loss): the backend and the chunk size are picked from the device at
# every call, and the gradients are made in forward and scaled in place in backward, none of which a traced graph would
# keep as it is; an opaque op keeps the memory behaviour that is its point.
@torch.compiler.disable
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_accuracy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `logit_scale * (hidden @ weight.T + bias)` (then softcapped) without full logits.

    Matches `F.cross_entropy(logits, labels, ignore_index=..., reduction=..., label_smoothing=...)` plus
    `z_loss * logsumexp(logits)**2` per token, except that a mean over zero tokens is 0 (not NaN) and
    "none" gives 0 at ignored positions. With `num_items` the loss is the per-token sum / num_items
    (0 if num_items is 0). The loss is fp32 (fp64 for fp64 inputs); gradients have the input dtypes.
    With `return_accuracy`, also returns the fraction of non-ignored tokens whose argmax is the label.
    A label outside [0, V) other than `ignore_index` makes the torch path raise (as F.cross_entropy) and the Triton
    path return NaN for the loss and its gradients (checking on the host would cost a device sync).
    Differentiable once: a mean or sum loss makes its gradients in the forward pass, so it takes one backward
    (no retain_graph=True), and none through its gradients (create_graph=True, e.g. a gradient penalty, raises).
    """
    _validate_options(reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size)
    _validate_inputs(hidden, weight, labels, bias, reduction, num_items)
    hidden_size = hidden.shape[-1]
    n_rows = math.prod(hidden.shape[:-1])
    hidden_2d = hidden.reshape(n_rows, hidden_size)
    flat_labels = labels.reshape(n_rows).to(torch.int64).contiguous()  # the kernel reads one label per row
    if isinstance(num_items, torch.Tensor):
        num_items_t = num_items.detach().reshape(()).to(hidden.device)
    elif num_items is not None:
        # torch.full passes the number as a kernel argument: no host-to-device copy.
        num_items_t = torch.full((), num_items, dtype=_compute_dtype(hidden.dtype), device=hidden.device)
    else:
        num_items_t = None
    # fp64 is the oracle dtype: the kernel computes in fp32, so fp64 always takes the reference.
    backend = "torch" if hidden.dtype == torch.float64 else resolve_backend(hidden.device)
    if chunk_size is None:
        weight_grad = weight.requires_grad and torch.is_grad_enabled()
        chunk_size = _default_chunk_size(n_rows, weight.shape[0], hidden.dtype, hidden.device, backend,
                                         hidden_size if weight_grad else 0)
    cfg = _LossConfig(ignore_index, float(label_smoothing), float(z_loss), softcap, float(logit_scale))

    loss, accuracy = _LinearCrossEntropyFunction.apply(
        hidden_2d,
        weight,
        bias,
        flat_labels,
        num_items_t,
        cfg,
        reduction,
        chunk_size,
        return_accuracy,
        torch.is_grad_enabled(),
        backend,
    )
    if reduction == "none":
        loss = loss.view(labels.shape)
    return (loss, accuracy) if return_accuracy else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `fused_linear_cross_entropy`; the LM head weight is passed to `forward`."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        # Fail at construction rather than at the first training step.
        _validate_options(reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_items: int | float | torch.Tensor | None = None,
        return_accuracy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_items=num_items,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            return_accuracy=return_accuracy,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"logit_scale={self.logit_scale}, chunk_size={self.chunk_size}"
        )
