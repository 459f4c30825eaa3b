"""FusedAdamW on a GPU (run with -m gpu): every available backend (torch, Triton and, when lamelm_fast._C is built,
CUDA) against clip_grad_norm_ + torch.optim.AdamW at shapes spanning many chunks and with hundreds of tensors, no
host sync under torch.cuda's sync debug mode, 3 kernel launches per step, a deterministic norm, int64 offsets."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from lamelm_fast.ops.dispatch import cuda_extension, use_backend
from lamelm_fast.optim import FusedAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(1,), (37,), (4096, 1024), (1000, 4099), (3, 5, 7), (70_001,)]  # 1 element up to several chunks


def backends() -> list[str]:
    available = ["torch", "triton"]
    if torch.cuda.is_available() and cuda_extension() is not None:
        available.append("cuda")
    return available


@pytest.fixture(params=backends())
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    with use_backend(request.param):
        yield request.param


def make_params(dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [nn.Parameter((0.5 * torch.randn(s, device="cuda", generator=gen)).to(dtype)) for s in SHAPES]


def set_grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1000 + step)
    scale = 1.0 if step % 3 == 0 else 1e-3  # clipped on some steps only
    for p in params:
        p.grad = (scale * torch.randn(p.shape, device="cuda", generator=gen)).to(p.dtype)


def step_beside_torch(opt: FusedAdamW, ref_opt: torch.optim.Optimizer, schedulers: tuple, params: list[nn.Parameter],
                      ref: list[nn.Parameter], step: int, run_step: Callable[[], object] | None = None) -> None:
    """One step of ours and of clip_grad_norm_ + torch.optim.AdamW on the same gradients; the norms must agree."""
    set_grads(params, step)
    for p, r in zip(params, ref, strict=True):
        r.grad = p.grad.clone()
    (run_step or opt.step)()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    ref_opt.step()
    for scheduler in schedulers:
        scheduler.step()
    assert abs(opt.grad_norm.item() / ref_norm.item() - 1) < 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def test_matches_clip_grad_norm_and_torch_adamw(backend: str) -> None:
    params, ref = make_params(torch.float32), make_params(torch.float32)
    groups = [{"params": params[2:4]}, {"params": params[:2] + params[4:], "weight_decay": 0.0}]
    ref_groups = [{"params": ref[2:4]}, {"params": ref[:2] + ref[4:], "weight_decay": 0.0}]
    opt = FusedAdamW(groups, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 + 0.5 * math.sin(s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 + 0.5 * math.sin(s))
    for step in range(12):
        step_beside_torch(opt, ref_opt, (sched, ref_sched), params, ref, step)
    for p, r in zip(params, ref, strict=True):
        assert rel_err(p.detach(), r.detach()) < 1e-5
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(opt.state[p][key], ref_opt.state[r][key]) < 1e-5
        assert opt.state[p]["step"].item() == 12


def test_non_finite_norm_skips_the_step_bitwise(backend: str) -> None:
    params = make_params(torch.bfloat16)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0, master_weights=True)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    params[3].grad[7, 11] = math.inf
    before = [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]
    opt.step()
    after = [t for p in params for t in (p.detach(), *opt.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert opt.skipped_steps.item() == 1 and not math.isfinite(opt.grad_norm.item())


def test_mixed_precision_backends_agree() -> None:
    """bf16 params with an fp32 master copy and stochastic rounding: every backend computes the same step (the
    rounding noise is the same hash everywhere, so even the bf16 bits agree but for rare boundary cases)."""
    results = {}
    for name in backends():
        params = make_params(torch.bfloat16)
        opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0, master_weights=True, stochastic_rounding=True, seed=5)
        with use_backend(name):
            for step in range(5):
                set_grads(params, step)
                opt.step()
        results[name] = (torch.cat([p.detach().view(-1) for p in params]),
                         torch.cat([opt.state[p]["master_param"].view(-1) for p in params]))
    base_params, base_masters = results.pop("torch")
    for got_params, got_masters in results.values():
        assert rel_err(got_masters, base_masters) < 1e-5
        assert (got_params == base_params).double().mean().item() > 0.999


def test_step_never_syncs_with_the_host(backend: str) -> None:
    params = make_params(torch.bfloat16)
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0, master_weights=True)
    set_grads(params, 0)
    opt.step()  # state initialisation and kernel compilation happen here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            set_grads(params, step)
            opt.param_groups[0]["lr"] = 1e-3 / step  # a scheduler step: new hyperparameters every step
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps.item() == 0


def kernel_backends() -> list[str]:
    return [name for name in backends() if name != "torch"]


def device_work(step) -> tuple[list[str], int]:
    """(names of the kernels, number of memcpy/memset operations) that one call of ``step`` puts on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if not n.startswith(("Memcpy", "Memset"))]
    return kernels, len(names) - len(kernels)


@pytest.mark.parametrize("misaligned", [False, True], ids=["vectorized", "misaligned"])
@pytest.mark.parametrize("name", kernel_backends())
def test_hundreds_of_tensors_in_three_launches(name: str, misaligned: bool) -> None:
    """430 tensors (LoRA-like, odd sizes, multi-chunk ones): the kernel backends launch 3 kernels per step (sum of
    squares, finalize, update: the device tables replace per-launch pointer lists) and match clip_grad_norm_ +
    torch.optim.AdamW; with one param 4 bytes off a 16-byte boundary the bucket runs without vector accesses."""
    shapes = [(16, 1536), (1536, 16)] * 200 + [(7, 33), (1,), (40_001,)] * 10
    gen = torch.Generator(device="cuda").manual_seed(0)
    values = [0.5 * torch.randn(s, device="cuda", generator=gen) for s in shapes]
    if misaligned:
        base = torch.zeros(values[0].numel() + 1, device="cuda")
        base[1:].copy_(values[0].view(-1))
        values[0] = base[1:].view(shapes[0])
        assert values[0].data_ptr() % 16 == 4
    params = [nn.Parameter(v) for v in values]
    ref = [nn.Parameter(v.detach().clone()) for v in values]
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    with use_backend(name):
        kernels: list[str] = []

        def profiled_step() -> None:
            kernels.extend(device_work(opt.step)[0])

        for step in range(4):
            step_beside_torch(opt, ref_opt, (sched, ref_sched), params, ref, step, profiled_step if step == 3 else None)
            opt.zero_grad(set_to_none=True)
        assert len(kernels) == 3, kernels
    for p, r in zip(params, ref, strict=True):
        assert rel_err(p.detach(), r.detach()) < 1e-5
        assert rel_err(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"]) < 1e-5
        assert opt.state[p]["step"].item() == 4


@pytest.mark.parametrize("name", kernel_backends())
def test_norm_is_deterministic(name: str) -> None:
    """Fixed-order sums, no atomics: the same gradients give the same norm bit for bit."""
    norms = []
    for _ in range(2):
        params = [nn.Parameter(torch.zeros(s, device="cuda")) for s in [(1536, 16)] * 300 + [(70_001,)]]
        set_grads(params, 0)
        opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
        with use_backend(name):
            opt.step()
        norms.append(opt.grad_norm.clone())
    assert torch.equal(norms[0], norms[1])


def test_int64_offsets_in_a_tensor_past_2_31_elements() -> None:
    numel = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GB of GPU memory")
    param = nn.Parameter(torch.zeros(numel, device="cuda", dtype=torch.bfloat16))
    tail = slice(numel - 100_000, numel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    param.grad = torch.zeros_like(param)
    param.grad[tail] = torch.randn(100_000, device="cuda", generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        param[tail] = torch.randn(100_000, device="cuda", generator=gen).to(torch.bfloat16)
    ref = nn.Parameter(param.detach()[tail].float())
    ref.grad = param.grad[tail].float()
    for name in [b for b in backends() if b != "torch"]:
        opt = FusedAdamW([param], lr=1e-2, weight_decay=0.0)  # no clipping: elementwise, the tail alone is a reference
        with use_backend(name):
            opt.step()
        expected = ref.detach().clone().requires_grad_()
        expected.grad = ref.grad
        torch.optim.AdamW([expected], lr=1e-2, weight_decay=0.0).step()
        assert rel_err(opt.state[param]["exp_avg"][tail], (1 - 0.9) * ref.grad) < 1e-6
        assert (param.detach()[tail] == expected.detach().to(torch.bfloat16)).double().mean().item() > 0.999
        with torch.no_grad():
            param[tail] = ref.detach().to(torch.bfloat16)  # undo for the next backend
        del opt
        torch.cuda.empty_cache()
