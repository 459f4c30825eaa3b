"""The Triton FusedAdamW backend beyond numerics (tests/test_optim_reference.py): launch count whatever the number of
tensors and table re-use between steps. That the kernels compile for real GPUs, with 16-byte accesses where aligned:
tests/test_gpu_compile.py."""

from collections import Counter

import pytest
import torch
from torch import nn

from lamelm_fast.kernels import adamw as kernels
from lamelm_fast.ops.dispatch import use_backend
from lamelm_fast.optim import FusedAdamW, _adamw_tables, _adamw_work


def lora_like_params(count: int, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Many small tensors of odd sizes, like the adapters of a LoRA model."""
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(3 + i % 5, 1 + i % 7, generator=gen).to(dtype)) for i in range(count)]


def fake_grads(params: list[nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts kernel launches and host-to-device table uploads made by the Triton backend."""
    counts: Counter = Counter()

    def counting(name: str, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("sum_squares", "finalize", "adamw_update"):
        monkeypatch.setattr(kernels, name, counting(name, getattr(kernels, name)))
    monkeypatch.setattr(_adamw_tables, "upload", counting("upload", _adamw_work.upload))
    monkeypatch.setattr(_adamw_work, "upload", counting("upload", _adamw_work.upload))
    return counts


@pytest.mark.parametrize("count", [5, 60])
def test_three_launches_per_step_whatever_the_tensor_count(count: int, launches: Counter) -> None:
    params = lora_like_params(count)
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
    fake_grads(params, 0)
    with use_backend("triton"):
        opt.step()
    assert {k: launches[k] for k in ("sum_squares", "finalize", "adamw_update")} == {
        "sum_squares": 1, "finalize": 1, "adamw_update": 1}


def test_one_bucket_per_dtype_combination(launches: Counter) -> None:
    params = lora_like_params(6) + lora_like_params(5, torch.bfloat16)
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
    fake_grads(params, 0)
    with use_backend("triton"):
        opt.step()
    assert (launches["sum_squares"], launches["finalize"], launches["adamw_update"]) == (2, 1, 2)


def test_tables_are_uploaded_only_when_they_change(launches: Counter) -> None:
    params = lora_like_params(7)
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
    fake_grads(params, 0)
    with use_backend("triton"):
        opt.step()
        first = launches["upload"]
        assert first == 4  # tensor table, gradient pointers, chunk table, hyperparameters
        opt.step()  # same gradient tensors, same LR: nothing to upload
        assert launches["upload"] == first
        opt.param_groups[0]["lr"] = 2e-3  # a scheduler step: only the hyperparameter table changes
        opt.step()
        assert launches["upload"] == first + 1
        for p in params:  # new gradient tensors over the same memory, as the CUDA caching allocator hands out
            p.grad = p.grad.view(p.shape)
        opt.step()
        assert launches["upload"] == first + 1
        fake_grads(params, 1)  # gradients at new addresses: only the gradient pointers change
        opt.step()
        assert launches["upload"] == first + 2
