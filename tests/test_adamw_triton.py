"""The Triton FusedAdamW backend beyond numerics (tests/test_optim_reference.py): launch count whatever the number of
tensors, table re-use between steps, and that the kernels compile for real GPUs (PTX, no GPU needed)."""

import json
import os
import subprocess
import sys
import textwrap
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real (tests marked gpu)")
def test_kernels_compile_for_gpus_with_vectorized_accesses() -> None:
    """Compiles every kernel variant to PTX for sm_80 and sm_90 with Triton's own compiler (no GPU needed; the
    interpreter that runs the other tests never compiles). Aligned full chunks must use 16-byte accesses."""
    script = textwrap.dedent("""
        import json, re
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lamelm_fast.kernels import adamw as k

        def ptx(fn, signature, constexprs, arch):
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            src = ASTSource(fn, signature=signature, constexprs=constexprs)
            return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]

        def accesses(text):
            return sorted(set(re.findall(r"(?:ld|st)\\.global[.\\w]*", text)))

        VARIANTS = [  # (param, grad, master, stochastic, aligned): each switch on and off at least once
            ("fp32", "fp32", False, False, True), ("fp32", "fp32", False, False, False),
            ("bf16", "bf16", True, False, True), ("bf16", "bf16", False, True, True),
            ("bf16", "fp32", True, True, False), ("fp16", "fp16", True, False, True),
            ("fp16", "fp32", False, False, True),
        ]
        out = {}
        dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
        tables = {"meta": "*i64", "grads": "*i64", "chunks": "*i64"}
        for arch in (80, 90):
            for grad in dtypes:
                out[f"sum {grad} sm{arch}"] = accesses(ptx(k._sum_squares_kernel, {**tables, "partials": "*fp32"},
                    {"GRAD_DTYPE": dtypes[grad], "ALIGNED": True, "CHUNK": 16384, "BLOCK": 1024}, arch))
            for param, grad, master, stochastic, aligned in VARIANTS:
                out[f"update {param} {grad} master={master} sr={stochastic} aligned={aligned} sm{arch}"] = accesses(
                    ptx(k._adamw_kernel, {**tables, "hyper": "*fp64", "norm_ptr": "*fp32", "seed": "i32"},
                        {"PARAM_DTYPE": dtypes[param], "GRAD_DTYPE": dtypes[grad], "MASTER": master,
                         "STOCHASTIC": stochastic, "ALIGNED": aligned, "CHUNK": 16384, "BLOCK": 1024}, arch))
            ptx(k._finalize_kernel, {"partials": "*fp32", "num_partials": "i32", "meta": "*i64",
                "num_tensors": "i32", "norm_out": "*fp32", "skipped": "*i64"}, {"BLOCK": 1024}, arch)
        print(json.dumps(out))
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today; set to silence Triton's notice about changing it
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(variants) == 2 * (3 + 7)
    for name, accesses in variants.items():
        if name.startswith("sum") or "aligned=True" in name:
            assert "ld.global.v4.b32" in accesses, (name, accesses)
        if name.startswith("update") and "aligned=True" in name:
            assert "st.global.v4.b32" in accesses, (name, accesses)
