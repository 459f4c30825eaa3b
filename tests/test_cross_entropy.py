"""The fused linear cross-entropy against plain F.cross_entropy in float64, on both backends.

Every test runs with the torch reference and with the Triton kernel (under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lamelm_fast.ops.cross_entropy import (
    LinearCrossEntropyLoss,
    _default_chunk_size,
    fused_linear_cross_entropy,
)
from lamelm_fast.ops.dispatch import use_backend

IGNORE = -100
# Odd sizes so that no tested chunk size divides N and H != V.
N, H, V = 37, 19, 53


@pytest.fixture(autouse=True, params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    with use_backend(request.param):
        yield request.param


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(
    n: int = N,
    h: int = H,
    v: int = V,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_bias: bool = True,
    ignore_frac: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    # Logits of order 2-3, so that softcap and z-loss matter.
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.5 / math.sqrt(h))
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if with_bias else None, labels


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE,
    reduction: str = "mean",
    num_items: float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """The unfused definition: full logits, F.cross_entropy, z-loss added by hand."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_logits, flat_labels = logits.reshape(-1, weight.shape[0]), labels.reshape(-1)
    valid = flat_labels != ignore_index
    z_term = z_loss * torch.logsumexp(flat_logits, dim=-1).square() * valid

    def ce(red: str) -> torch.Tensor:
        return F.cross_entropy(
            flat_logits,
            flat_labels,
            ignore_index=ignore_index,
            reduction=red,
            label_smoothing=label_smoothing,
        )

    if reduction == "none":
        return (ce("none") + z_term).reshape(labels.shape)
    if num_items is not None:
        return (ce("sum") + z_term.sum()) / num_items
    if reduction == "sum":
        return ce("sum") + z_term.sum()
    return ce("mean") + z_term.sum() / valid.sum()


def _loss_and_grads(
    fn: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    dtype: torch.dtype,
    grad_out: torch.Tensor | float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Loss and [d hidden, d weight, d bias] of `fn` on fresh leaf copies of the inputs in `dtype`."""
    leaves = [
        None if t is None else t.detach().to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)
    ]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kwargs)
    if grad_out is None:
        loss.backward(torch.ones_like(loss))
    elif isinstance(grad_out, torch.Tensor):
        loss.backward(grad_out.to(loss.dtype))
    else:
        (loss * grad_out).backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-30)).item()


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    dtype: torch.dtype,
    tol: float,
    chunk_size: int | None = None,
    grad_out: torch.Tensor | float | None = None,
    **kwargs: object,
) -> None:
    loss, grads = _loss_and_grads(
        fused_linear_cross_entropy,
        hidden,
        weight,
        bias,
        labels,
        dtype=dtype,
        grad_out=grad_out,
        chunk_size=chunk_size,
        **kwargs,
    )
    ref_loss, ref_grads = _loss_and_grads(
        _reference, hidden, weight, bias, labels, dtype=torch.float64, grad_out=grad_out, **kwargs
    )
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert _rel_err(loss, ref_loss) < tol, ("loss", _rel_err(loss, ref_loss))
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        if ref is None:
            assert grad is None
            continue
        assert grad.dtype == dtype, name
        assert _rel_err(grad, ref) < tol, (name, _rel_err(grad, ref))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("logit_scale", [1.0, 0.7])
def test_matches_reference_fp32(
    reduction: str,
    label_smoothing: float,
    with_bias: bool,
    softcap: float | None,
    z_loss: float,
    logit_scale: float,
) -> None:
    hidden, weight, bias, labels = _inputs(with_bias=with_bias, seed=1)
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float32,
        tol=1e-5,
        chunk_size=8,
        reduction=reduction,
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        logit_scale=logit_scale,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 8, 16, N, 100, None])
def test_chunk_sizes(reduction: str, chunk_size: int | None) -> None:
    hidden, weight, bias, labels = _inputs(seed=2)
    opts = {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-2, "logit_scale": 1.3}
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float32,
        tol=1e-5,
        chunk_size=chunk_size,
        reduction=reduction,
        **opts,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts",
    [{}, {"label_smoothing": 0.2, "softcap": 2.0, "z_loss": 1e-2, "logit_scale": 0.7}],
    ids=["plain", "all_options"],
)
def test_matches_reference_fp64(reduction: str, opts: dict[str, float]) -> None:
    hidden, weight, bias, labels = _inputs(seed=3)
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float64,
        tol=1e-10,
        chunk_size=16,
        reduction=reduction,
        **opts,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_dims(reduction: str) -> None:
    hidden, weight, bias, labels = _inputs(n=3 * 13, seed=4)
    hidden, labels = hidden.reshape(3, 13, H), labels.reshape(3, 13)
    _check(hidden, weight, bias, labels, dtype=torch.float32, tol=1e-5, chunk_size=8, reduction=reduction)
    if reduction == "none":
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none")
        assert loss.shape == (3, 13)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "num_items",
    [11, 7.5, torch.tensor(13), torch.tensor(13.0)],
    ids=["int", "float", "int_tensor", "float_tensor"],
)
def test_num_items(reduction: str, num_items: float | torch.Tensor) -> None:
    hidden, weight, bias, labels = _inputs(seed=5)
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float32,
        tol=1e-5,
        chunk_size=8,
        reduction=reduction,
        num_items=num_items,
        label_smoothing=0.1,
        z_loss=1e-2,
    )


@pytest.mark.parametrize("num_items", [0, torch.tensor(0)], ids=["python", "tensor"])
def test_num_items_zero_gives_zero_not_nan(num_items: int | torch.Tensor) -> None:
    hidden, weight, bias, labels = _inputs(seed=6)
    loss, grads = _loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, dtype=torch.float32, num_items=num_items
    )
    assert loss.item() == 0.0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction: str) -> None:
    hidden, weight, bias, labels = _inputs(seed=7, ignore_frac=1.0)
    assert (labels == IGNORE).all()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, accuracy = fused_linear_cross_entropy(
        leaves[0],
        leaves[1],
        labels,
        bias=leaves[2],
        reduction=reduction,
        label_smoothing=0.1,
        z_loss=1e-2,
        softcap=2.0,
        return_accuracy=True,
        chunk_size=8,
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert accuracy.item() == 0.0
    loss.sum().backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead_shape", [(0,), (3, 0)])
def test_empty_batch(reduction: str, lead_shape: tuple[int, ...]) -> None:
    hidden = torch.randn(*lead_shape, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    labels = torch.empty(lead_shape, dtype=torch.int64)
    loss, accuracy = fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, reduction=reduction, z_loss=1e-2, return_accuracy=True
    )
    assert loss.shape == (lead_shape if reduction == "none" else ())
    assert loss.requires_grad
    assert accuracy.item() == 0.0
    loss.sum().backward()
    assert hidden.grad.shape == hidden.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(reduction: str) -> None:
    hidden, weight, bias, labels = _inputs(seed=8)
    # Transposed storage for hidden and weight, strided bias and labels.
    hidden_base = hidden.T.contiguous().requires_grad_()
    weight_base = weight.T.contiguous().requires_grad_()
    bias_base = torch.stack([bias, torch.zeros_like(bias)], dim=1).reshape(-1).requires_grad_()
    labels_strided = torch.stack([labels, torch.zeros_like(labels)], dim=1)[:, 0]
    hidden_view, weight_view, bias_view = hidden_base.T, weight_base.T, bias_base[::2]
    for view in (hidden_view, weight_view, bias_view, labels_strided):
        assert not view.is_contiguous()

    opts = {"reduction": reduction, "label_smoothing": 0.1, "softcap": 2.0}
    loss = fused_linear_cross_entropy(
        hidden_view, weight_view, labels_strided, bias=bias_view, chunk_size=8, **opts
    )
    loss.sum().backward()
    ref_loss, ref_grads = _loss_and_grads(
        _reference, hidden, weight, bias, labels, dtype=torch.float64, **opts
    )
    assert _rel_err(loss.detach(), ref_loss) < 1e-5
    assert _rel_err(hidden_base.grad.T, ref_grads[0]) < 1e-5
    assert _rel_err(weight_base.grad.T, ref_grads[1]) < 1e-5
    assert _rel_err(bias_base.grad[::2], ref_grads[2]) < 1e-5
    assert torch.equal(bias_base.grad[1::2], torch.zeros(V))


class _OpRecorder(TorchDispatchMode):
    """Records (op, output shape) for every tensor produced by any aten op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[torch._ops.OpOverload, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.records.append((func, tuple(leaf.shape), leaf.dtype))
        return out

    def max_bytes(self) -> int:
        # Bytes, not elements: Triton's interpreter copies kernel arguments as raw uint8 storage.
        return max(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.records)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ["frozen_weight", "hidden_without_grad", "no_grad_mode"])
def test_skips_unneeded_gradients(reduction: str, case: str) -> None:
    chunk = 8
    hidden, weight, bias, labels = _inputs(seed=9)
    hidden.requires_grad_(case != "hidden_without_grad")
    weight.requires_grad_(case != "frozen_weight")
    bias.requires_grad_()
    opts = {"reduction": reduction, "label_smoothing": 0.1, "chunk_size": chunk}

    with _OpRecorder() as recorder:
        if case == "no_grad_mode":
            with torch.no_grad():
                loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **opts)
            assert not loss.requires_grad
        else:
            loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **opts)
            loss.sum().backward()

    # grad_weight is the only [V, H] tensor; grad_hidden chunks are the only matmuls with H columns.
    weight_grad_made = any(shape == (V, H) for _, shape, _ in recorder.records)
    hidden_grad_made = any(
        func.overloadpacket is torch.ops.aten.mm and shape[-1] == H for func, shape, _ in recorder.records
    )
    assert any(shape == (chunk, V) for _, shape, _ in recorder.records)  # the recorder does see the pass
    assert weight_grad_made == (case == "hidden_without_grad")
    assert hidden_grad_made == (case == "frozen_weight")
    if case == "no_grad_mode":
        return
    ref_loss, ref_grads = _loss_and_grads(
        _reference,
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float64,
        reduction=reduction,
        label_smoothing=0.1,
    )
    assert _rel_err(loss.detach(), ref_loss) < 1e-5
    assert _rel_err(bias.grad, ref_grads[2]) < 1e-5
    if case == "frozen_weight":
        assert weight.grad is None
        assert _rel_err(hidden.grad, ref_grads[0]) < 1e-5
    else:
        assert hidden.grad is None
        assert _rel_err(weight.grad, ref_grads[1]) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_inputs(reduction: str) -> None:
    hidden, weight, bias, labels = _inputs(seed=10)
    # The reference sees the same bf16-rounded values, in float64.
    hidden, weight, bias = (t.to(torch.bfloat16) for t in (hidden, weight, bias))
    opts = {"label_smoothing": 0.1, "softcap": 2.0, "z_loss": 1e-2, "logit_scale": 0.7}
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.bfloat16,
        tol=1e-2,
        chunk_size=8,
        reduction=reduction,
        **opts,
    )
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with _OpRecorder() as recorder:
        loss = fused_linear_cross_entropy(
            leaves[0], leaves[1], labels, bias=leaves[2], reduction=reduction, chunk_size=8, **opts
        )
        loss.sum().backward()
    # Gradients summed over chunks accumulate in fp32, not in bf16.
    accumulations = [
        (shape, dtype)
        for func, shape, dtype in recorder.records
        if func.overloadpacket in (torch.ops.aten.addmm_, torch.ops.aten.add_) and shape in ((V, H), (V,))
    ]
    assert {shape for shape, _ in accumulations} == {(V, H), (V,)}
    assert all(dtype == torch.float32 for _, dtype in accumulations)


def test_one_chunk_writes_the_weight_gradient_without_an_fp32_buffer(backend: str) -> None:
    """All rows in one chunk, 16-bit inputs: grad_weight is the product of one GEMM in the input dtype; no V x H fp32
    tensor exists (with several chunks one does: the accumulator). Same values as the float64 reference."""
    dtype = torch.float16  # the interpreter's bf16 arithmetic is not the GPU's
    hidden, weight, _, labels = _inputs(seed=41)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with _OpRecorder() as recorder:
        fused_linear_cross_entropy(leaves[0], leaves[1], labels, chunk_size=N).backward()
    assert not any(shape == (V, H) and kind == torch.float32 for _, shape, kind in recorder.records)
    assert leaves[1].grad.dtype == dtype
    _, ref_grads = _loss_and_grads(_reference, hidden, weight, None, labels, dtype=torch.float64)
    assert _rel_err(leaves[1].grad, ref_grads[1]) < 1e-2
    with _OpRecorder() as recorder:
        fused_linear_cross_entropy(*(t.detach().requires_grad_() for t in (hidden, weight)), labels,
                                   chunk_size=N // 2).backward()
    assert any(shape == (V, H) and kind == torch.float32 for _, shape, kind in recorder.records)


class _LiveChunks(TorchDispatchMode):
    """The most [rows, V] tensors (a chunk's logits or their gradient, rows <= N // 3) alive at once, counted each
    time one is made."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: list[weakref.ref[torch.Tensor]] = []
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        # A chunk's rows (N // 3 at most), not the weight's [H, V] transpose (H > N // 3), alive throughout.
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == V and out.shape[0] <= N // 3:
            self.alive = [ref for ref in self.alive if ref() is not None and ref() is not out]
            self.alive.append(weakref.ref(out))
            # Distinct storages: the Triton interpreter hands a kernel's result back through new tensor objects.
            storages = {ref().untyped_storage().data_ptr() for ref in self.alive if ref() is not None}
            self.most = max(self.most, len(storages))
        return out


def test_one_chunk_of_logits_is_alive_at_a_time(backend: str) -> None:
    """The next chunk's logits are made after the previous chunk's are freed: the peak holds one chunk, as the
    chunk size was chosen for (the 2026-11-23 H100 run of two chunks peaked at two)."""
    hidden, weight, _, labels = _inputs(seed=43)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with _LiveChunks() as live:
        fused_linear_cross_entropy(leaves[0], leaves[1], labels, chunk_size=N // 3).backward()
    assert live.most == 1


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}], ids=["plain", "smoothing_zloss"])
def test_the_torch_path_writes_softmax_and_gradient_over_the_logits(backend: str, opts: dict[str, float]) -> None:
    """No op but the logits' matmul allocates a chunk of logits' worth: the log-sum-exp, the softmax and its gradient
    reuse the logits' buffer (torch.logsumexp made a chunk-sized temporary of its own: on CPU its page faults cost
    more than the pass). Softcap keeps a second buffer by design (its derivative needs the capped logits)."""
    if backend != "torch":
        pytest.skip("the torch path's buffers: the Triton kernel overwrites the logits in place, and the "
                    "interpreter's argument copies would be counted")
    hidden, weight, _, labels = _inputs(seed=44)
    chunk = 24  # two chunks; a chunk of logits outweighs the [V, H] and [N, H] gradients
    leaves = [t.float().requires_grad_() for t in (hidden, weight)]
    with torch.profiler.profile(profile_memory=True) as prof:
        fused_linear_cross_entropy(leaves[0], leaves[1], labels, chunk_size=chunk, **opts).backward()
    chunk_bytes = chunk * V * 4
    assert chunk_bytes > V * H * 4
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    assert any(e.name == "aten::mm" and e.self_cpu_memory_usage >= chunk_bytes for e in events)  # it does see them
    allocating = [(e.name, e.self_cpu_memory_usage) for e in events
                  if e.name != "aten::mm" and e.self_cpu_memory_usage >= chunk_bytes]
    assert not allocating


@pytest.mark.parametrize("chunk_size", [1, 8, None])
@pytest.mark.parametrize(
    "opts",
    [{}, {"softcap": 2.0, "logit_scale": -1.0}, {"logit_scale": 0.5}],
    ids=["plain", "negated", "scaled"],
)
def test_accuracy_matches_full_logits(chunk_size: int | None, opts: dict[str, float]) -> None:
    hidden, weight, bias, labels = _inputs(seed=11, ignore_frac=0.3)
    full_logits = opts.get("logit_scale", 1.0) * (hidden.double() @ weight.double().T + bias.double())
    predictions = full_logits.argmax(dim=-1)
    # Make about half of the rows right, so the expected accuracy is far from 0 and 1.
    take = torch.rand(N, generator=torch.Generator().manual_seed(0)) < 0.5
    labels = torch.where(take & (labels != IGNORE), predictions, labels)
    valid = labels != IGNORE
    correct = ((predictions == labels) & valid).sum()
    assert 0 < correct < valid.sum()

    hidden.requires_grad_()
    loss, accuracy = fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, return_accuracy=True, chunk_size=chunk_size, **opts
    )
    assert accuracy.dtype == torch.float32
    assert accuracy.shape == ()
    assert not accuracy.requires_grad
    assert loss.requires_grad
    assert accuracy.item() == (correct / valid.sum()).item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_inside_vocab(reduction: str) -> None:
    # A real class id (e.g. the pad token) as ignore_index: those rows must be skipped, not scored.
    hidden, weight, bias, labels = _inputs(seed=20)
    predictions = (hidden.double() @ weight.double().T + bias.double()).argmax(dim=-1)
    ignore_index = predictions.mode().values.item()
    # Valid rows are labelled with their prediction; ignored rows include some the model "gets right".
    labels = torch.where((labels == IGNORE) | (predictions == ignore_index), ignore_index, predictions)
    assert (predictions == ignore_index).sum() > 0
    assert (labels != ignore_index).sum() > 0
    opts = {"ignore_index": ignore_index, "reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2}
    _check(hidden, weight, bias, labels, dtype=torch.float32, tol=1e-5, chunk_size=8, **opts)
    _, accuracy = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, return_accuracy=True, **opts)
    assert accuracy.item() == 1.0


@pytest.mark.parametrize("label", [V, -1, 10 * V])
def test_a_label_outside_the_vocabulary_is_never_a_finite_loss(backend: str, label: int) -> None:
    """A tokenizer bigger than the model: torch raises as F.cross_entropy does; the Triton kernel, which must not
    read past the row nor sync to raise, makes that row's loss and gradients NaN (the optimizer then skips)."""
    hidden, weight, bias, labels = _inputs(seed=21)
    hidden.requires_grad_(True)
    labels[(labels != IGNORE).nonzero()[0]] = label
    if backend == "torch":
        with pytest.raises(RuntimeError, match="out of bounds"):
            fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
        return
    per_token = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none")
    bad = labels == label
    assert per_token[bad].isnan().all() and per_token[~bad].isfinite().all()
    per_token.nansum().backward()
    assert hidden.grad[bad].isnan().all() and hidden.grad[~bad].isfinite().all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_grad_output(reduction: str) -> None:
    hidden, weight, bias, labels = _inputs(seed=12)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0}
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float32,
        tol=1e-5,
        chunk_size=8,
        grad_out=3.7,
        reduction=reduction,
        **opts,
    )


def test_per_token_grad_output() -> None:
    hidden, weight, bias, labels = _inputs(seed=13)
    grad_out = torch.randn(N, generator=torch.Generator().manual_seed(1))
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0, "logit_scale": 0.7}
    _check(
        hidden,
        weight,
        bias,
        labels,
        dtype=torch.float32,
        tol=1e-5,
        chunk_size=8,
        grad_out=grad_out,
        reduction="none",
        **opts,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_materialises_full_logits(reduction: str) -> None:
    n, h, v, chunk = 136, 24, 1000, 32  # 4 full chunks and a part: full logits would be over 4x the bound below
    hidden, weight, bias, labels = _inputs(n, h, v, seed=14)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0, "logit_scale": 0.7}
    with _OpRecorder() as forward_ops:
        loss = fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, reduction=reduction, chunk_size=chunk, **opts
        )
    with _OpRecorder() as backward_ops:
        loss.sum().backward()

    bound = max(chunk * v, v * h, n * h) * 4  # fp32
    assert bound < n * v * 4
    assert forward_ops.max_bytes() <= bound
    assert backward_ops.max_bytes() <= bound
    # The chunk logits are visible to the recorder, so the bound above is really checked.
    assert any(shape == (chunk, v) for _, shape, _ in forward_ops.records)
    if reduction == "none":
        assert any(shape == (chunk, v) for _, shape, _ in backward_ops.records)
    ref_loss, ref_grads = _loss_and_grads(
        _reference, hidden, weight, bias, labels, dtype=torch.float64, reduction=reduction, **opts
    )
    assert _rel_err(loss.detach(), ref_loss) < 1e-5
    for leaf, ref in zip((hidden, weight, bias), ref_grads, strict=True):
        assert _rel_err(leaf.grad, ref) < 1e-5


def test_second_backward_of_scalar_loss_raises() -> None:
    hidden, weight, bias, labels = _inputs(seed=15)
    weight.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_double_backward_raises_instead_of_a_wrong_second_derivative() -> None:
    """The gradients are made in forward, outside any graph: differentiating through them (create_graph=True) must
    raise, not give a second derivative that misses their dependence on hidden and weight."""
    hidden, weight, bias, labels = _inputs(seed=17)
    hidden.requires_grad_()
    factor = torch.tensor(1.5, requires_grad=True)  # the grad_output of the loss then depends on a leaf
    loss = factor * fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_hidden.square().sum().backward()


def test_second_backward_of_per_token_loss_recomputes() -> None:
    hidden, weight, bias, labels = _inputs(seed=16)
    weight.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none", chunk_size=8)
    loss.sum().backward(retain_graph=True)
    once = weight.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(weight.grad, 2 * once)


def test_labels_any_integer_dtype() -> None:
    hidden, weight, bias, labels = _inputs(seed=17)
    expected = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none", chunk_size=8)
    for dtype in (torch.int32, torch.int16):
        got = fused_linear_cross_entropy(
            hidden, weight, labels.to(dtype), bias=bias, reduction="none", chunk_size=8
        )
        assert torch.equal(got, expected)


def test_module_equals_function() -> None:
    hidden, weight, bias, labels = _inputs(seed=18)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0, "logit_scale": 0.7, "chunk_size": 8}
    module = LinearCrossEntropyLoss(reduction="sum", **opts)
    assert "softcap=2.0" in repr(module)
    results = []
    for call in (
        lambda h, w, b: module(h, w, labels, b, num_items=9, return_accuracy=True),
        lambda h, w, b: fused_linear_cross_entropy(
            h, w, labels, bias=b, reduction="sum", num_items=9, return_accuracy=True, **opts
        ),
    ):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, accuracy = call(*leaves)
        loss.backward()
        results.append((loss.detach(), accuracy, *(t.grad for t in leaves)))
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


def test_default_chunk_size() -> None:
    cpu = torch.device("cpu")
    vocab = 128_256
    for dtype, row_bytes in ((torch.float32, 8 * vocab), (torch.bfloat16, 10 * vocab)):
        rows = _default_chunk_size(1_000_000, vocab, dtype, cpu)
        assert 8 < rows <= 64 * 2**20 // row_bytes
        assert rows % 8 == 0
        assert rows > 64 * 2**20 // row_bytes - 8  # uses the budget, not just any small value
    assert _default_chunk_size(5, vocab, torch.float32, cpu) == 5  # never more than N
    # Rows that fit are one chunk, not a multiple of 8 plus a sliver of a second (which, for 16-bit inputs, also
    # needs the [V, H] fp32 accumulator): the embedded model's packed batches of ~600 tokens split 592 + 6.
    assert _default_chunk_size(598, 4096, torch.float32, cpu) == 598
    assert _default_chunk_size(598, 4096, torch.bfloat16, cpu) == 598
    assert _default_chunk_size(0, vocab, torch.float32, cpu) == 1
    assert _default_chunk_size(1_000, 10**9, torch.float32, cpu) == 1  # at least one row
    # Triton path, 16-bit logits: one chunk while its logits fit the budget plus the fp32 accumulator that several
    # chunks would need for the weight gradient (64 MiB + 4 B x V x H on CPU).
    budget_rows = 64 * 2**20 // (2 * vocab)
    extra_rows = 4 * vocab * 512 // (2 * vocab)  # the accumulator's bytes, in rows of bf16 logits
    single = budget_rows + extra_rows
    assert _default_chunk_size(single, vocab, torch.bfloat16, cpu, "triton", 512) == single
    assert _default_chunk_size(single + 1, vocab, torch.bfloat16, cpu, "triton", 512) <= budget_rows
    assert _default_chunk_size(single, vocab, torch.bfloat16, cpu, "triton") <= budget_rows  # no weight gradient
    assert _default_chunk_size(single, vocab, torch.float32, cpu, "triton", 512) <= budget_rows  # fp32: no saving


_BAD_ARGUMENTS = [
    ({"weight": torch.randn(V, H + 1)}, "weight"),
    ({"weight": torch.randn(V, H, dtype=torch.float64)}, "weight"),
    ({"labels": torch.zeros(N + 1, dtype=torch.int64)}, "labels"),
    ({"labels": torch.zeros(N)}, "labels"),
    ({"bias": torch.randn(V + 1)}, "bias"),
    ({"reduction": "avg"}, "reduction"),
    ({"reduction": "none", "num_items": 5}, "num_items"),
    ({"num_items": -1}, "num_items"),
    ({"num_items": torch.ones(2)}, "num_items"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"softcap": 0.0}, "softcap"),
    ({"softcap": -30.0}, "softcap"),
    ({"z_loss": -1e-4}, "z_loss"),
    ({"chunk_size": 0}, "chunk_size"),
]


@pytest.mark.parametrize(
    ("overrides", "name"), _BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(_BAD_ARGUMENTS)]
)
def test_invalid_arguments(overrides: dict[str, object], name: str) -> None:
    hidden, weight, bias, labels = _inputs(seed=19)
    args = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias, **overrides}
    with pytest.raises(ValueError, match=name):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"softcap": 0}, "softcap"),
    ],
)
def test_module_validates_at_construction(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LinearCrossEntropyLoss(**kwargs)


def test_backend_switch_reaches_the_kernel(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards the parametrisation itself: "triton" must really launch the kernel, "torch" must not.
    from lamelm_fast.kernels import cross_entropy as kernels

    launches: list[int] = []
    original = kernels.cross_entropy_rows
    monkeypatch.setattr(kernels, "cross_entropy_rows", lambda logits, *a, **k: (launches.append(logits.shape[0]),
                                                                                original(logits, *a, **k)))
    hidden, weight, bias, labels = _inputs(seed=21)
    fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=16)
    assert launches == ([16, 16, N - 32] if backend == "triton" else [])


def test_gradient_scale_of_one_is_skipped_on_device(backend: str) -> None:
    if backend != "triton":
        pytest.skip("the device-side skip is the Triton kernel's")
    from lamelm_fast.kernels.cross_entropy import scale_inplace

    values = torch.randn(1001)
    for scale, expected in ((1.0, values), (-2.5, values * -2.5)):
        x = values.clone()
        scale_inplace(x, torch.tensor(scale))
        assert torch.equal(x, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, h", [(17_000, 256), (3_000, 512)], ids=["past-2^31", "one-chunk-in-bf16"])
def test_gpu_real_vocabulary_matches_full_logits(backend: str, dtype: torch.dtype, n: int, h: int) -> None:
    """Llama-3 vocabulary on the GPU against full fp32 logits computed in row blocks: N x V past 2^31 (several
    chunks, fp32 weight-gradient accumulator), and few enough rows for one chunk in bf16 (one GEMM writes the
    weight gradient, no fp32 V x H buffer)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    v = 128_256
    gen = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    labels[torch.rand(n, device="cuda", generator=gen) < 0.3] = IGNORE
    with _OpRecorder() as recorder:
        loss, accuracy = fused_linear_cross_entropy(hidden, weight, labels, return_accuracy=True)
        loss.backward()
    fp32_weight_sized = any(shape == (v, h) and kind == torch.float32 for _, shape, kind in recorder.records)
    assert fp32_weight_sized == (dtype == torch.float32 or n == 17_000)
    ref_loss = torch.zeros((), device="cuda", dtype=torch.float64)
    ref_grad_hidden = torch.empty(n, h, device="cuda")
    ref_grad_weight = torch.zeros(v, h, device="cuda", dtype=torch.float64)
    correct = torch.zeros((), device="cuda", dtype=torch.int64)
    valid = (labels != IGNORE).sum()
    for start in range(0, n, 2048):
        rows = slice(start, start + 2048)
        h32, w32 = hidden.detach()[rows].float(), weight.detach().float()
        logits = (h32 @ w32.T).requires_grad_()
        chunk_loss = F.cross_entropy(logits, labels[rows], ignore_index=IGNORE, reduction="sum") / valid
        chunk_loss.backward()
        ref_loss += chunk_loss.detach().double()
        ref_grad_hidden[rows] = logits.grad @ w32
        ref_grad_weight += (logits.grad.T @ h32).double()
        correct += ((logits.detach().argmax(1) == labels[rows]) & (labels[rows] != IGNORE)).sum()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert _rel_err(loss.detach(), ref_loss) < tol
    assert _rel_err(hidden.grad.float(), ref_grad_hidden) < tol
    assert _rel_err(weight.grad.float(), ref_grad_weight) < tol
    assert abs(accuracy.item() - correct.item() / valid.item()) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
