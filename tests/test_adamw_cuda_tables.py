"""The CUDA FusedAdamW backend's Python side on CPU: the tables it hands to csrc/ and how many launches it makes.

No GPU here, so a stand-in for ``lamelm_fast._C`` takes the calls: it checks the arguments as csrc/bindings.cpp
does and runs the Triton kernels (interpreted) on the very same tables, since the CUDA kernels read the same
layout (the header's columns are compared with kernels/adamw.py below). tests/test_adamw_gpu.py runs the real
kernels when a GPU is there.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lamelm_fast.kernels import adamw as kernels
from lamelm_fast.optim import FusedAdamW, _adamw_cuda
from lamelm_fast.optim import adamw as adamw_module

CSRC = Path(__file__).resolve().parents[1] / "csrc"
DTYPES = {code: dtype for dtype, code in _adamw_cuda.DTYPE_CODES.items()}


class FakeExtension:
    """``lamelm_fast._C`` for CPU tests: the bindings' checks, then the Triton kernels on the same tables."""

    def __init__(self) -> None:
        self.launches: Counter = Counter()
        self.calls: list[tuple[str, dict]] = []

    @staticmethod
    def _check_table(table: torch.Tensor, dtype: torch.dtype, width: int) -> None:
        assert table.dtype == dtype and table.dim() == 2 and table.shape[1] == width and table.is_contiguous()

    @staticmethod
    def _check_grads(grads: torch.Tensor, meta: torch.Tensor) -> None:
        assert grads.dtype == torch.int64 and grads.dim() == 1 and grads.shape[0] == meta.shape[0]

    def adamw_sum_squares(self, meta, grads, chunks, partials, grad_dtype, vectorized, chunk_size, stream) -> None:
        self._check_table(meta, torch.int64, kernels.META_WIDTH)
        self._check_grads(grads, meta)
        self._check_table(chunks, torch.int64, 2)
        assert partials.dtype == torch.float32 and partials.numel() == chunks.shape[0] and partials.is_contiguous()
        assert chunk_size > 0 and chunk_size % 4 == 0 and isinstance(stream, int)
        self.calls.append(("sum_squares", {"grad_dtype": grad_dtype, "vectorized": vectorized}))
        if chunks.shape[0]:  # csrc launches nothing for an empty chunk table
            self.launches["sum_squares"] += 1
            kernels.sum_squares(meta, grads, chunks, partials, grad_dtype=DTYPES[grad_dtype], aligned=vectorized,
                                chunk_size=chunk_size, block=32, num_warps=1)

    def adamw_finalize(self, partials, meta, norm, skipped, stream) -> None:
        self._check_table(meta, torch.int64, kernels.META_WIDTH)
        assert partials.dtype == torch.float32 and partials.is_contiguous()
        assert norm.dtype == torch.float32 and norm.numel() == 1 and skipped.dtype == torch.int64
        self.calls.append(("finalize", {"tensors": meta.shape[0]}))
        self.launches["finalize"] += 1
        kernels.finalize(partials, meta, norm, skipped, block=32, num_warps=1)

    def adamw_update(self, meta, grads, chunks, hyper, norm, param_dtype, grad_dtype, use_master, stochastic,
                     vectorized, seed, chunk_size, stream) -> None:
        self._check_table(meta, torch.int64, kernels.META_WIDTH)
        self._check_grads(grads, meta)
        self._check_table(chunks, torch.int64, 2)
        self._check_table(hyper, torch.float64, kernels.HYPER_WIDTH)
        assert isinstance(seed, int) and chunk_size % 4 == 0 and isinstance(stream, int)
        self.calls.append(("update", {"param_dtype": param_dtype, "grad_dtype": grad_dtype, "master": use_master,
                                      "stochastic": stochastic, "vectorized": vectorized}))
        if chunks.shape[0]:
            self.launches["update"] += 1
            kernels.adamw_update(meta, grads, chunks, hyper, norm, param_dtype=DTYPES[param_dtype],
                                 grad_dtype=DTYPES[grad_dtype], master=use_master, stochastic=stochastic, seed=seed,
                                 aligned=vectorized, chunk_size=chunk_size, block=32, num_warps=1)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeExtension]:
    """FusedAdamW steps on CPU tensors through CudaAdamW and the stand-in extension, with 128-element chunks."""
    ext = FakeExtension()
    monkeypatch.setattr(_adamw_cuda, "cuda_extension", lambda: ext)
    monkeypatch.setattr(_adamw_cuda, "CHUNK_SIZE", 128)
    monkeypatch.setattr(_adamw_cuda.CudaAdamW, "_stream", staticmethod(lambda device: 0))
    monkeypatch.setattr(adamw_module, "resolve_backend", lambda device, **kwargs: "cuda")
    yield ext


def _header_enum(first: str) -> list[str]:
    """Names of the C enum in csrc/adamw.h that starts with ``first``, in value order (implicit values)."""
    body = re.search(r"enum\s*\{\s*(" + first + r"\b[^}]*)\}", (CSRC / "adamw.h").read_text()).group(1)
    names = [entry.split("=")[0].strip() for entry in body.split(",")]
    assert all("=" not in entry for entry in body.split(",")[1:]), "values after the first must be implicit"
    return names


def test_header_columns_and_dtype_codes_match_python() -> None:
    meta = _header_enum("LAMELM_META_PARAM")
    assert meta == [f"LAMELM_META_{c.upper()}" for c in kernels.META_COLUMNS] + ["LAMELM_META_WIDTH"]
    hyper = _header_enum("LAMELM_LR")
    assert hyper == [f"LAMELM_{c.upper()}" for c in kernels.HYPER_COLUMNS] + ["LAMELM_HYPER_WIDTH"]
    codes = dict(re.findall(r"LAMELM_(FLOAT32|FLOAT16|BFLOAT16)\s*=\s*(\d+)", (CSRC / "adamw.h").read_text()))
    names = {torch.float32: "FLOAT32", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16"}
    assert {dtype: int(codes[names[dtype]]) for dtype in names} == _adamw_cuda.DTYPE_CODES
    assert len(kernels.meta_row(*range(kernels.META_WIDTH))) == kernels.META_WIDTH


def test_stand_in_takes_the_bindings_arguments_in_their_order() -> None:
    """The positional order CudaAdamW uses must be the pybind functions' order in csrc/bindings.cpp."""
    source = (CSRC / "bindings.cpp").read_text()
    for name in ("adamw_sum_squares", "adamw_finalize", "adamw_update"):
        params = re.search(r"void " + name + r"\(([^)]*)\)", source).group(1)
        cpp = [re.split(r"[\s&*]+", p.strip())[-1] for p in params.split(",")]
        ours = list(inspect.signature(getattr(FakeExtension, name)).parameters)[1:]
        assert cpp == ours, name


def lora_like(count: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter((0.5 * torch.randn(1 + i % 5, 1 + i % 53, generator=gen)).to(dtype)) for i in range(count)]


def set_grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    scale = 1.0 if step % 2 == 0 else 1e-3  # clipped on even steps only (hundreds of tensors)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def test_hundreds_of_tensors_in_three_launches_per_step(fake_cuda: FakeExtension) -> None:
    params, ref = lora_like(200), lora_like(200)
    assert sum(-(-p.numel() // 128) for p in params) > 200  # some tensors span several chunks
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    clipped = []
    for step in range(2):
        set_grads(params, step)
        for p, r in zip(params, ref, strict=True):
            r.grad = p.grad.clone()
        before = sum(fake_cuda.launches.values())
        opt.step()
        assert sum(fake_cuda.launches.values()) - before == 3
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        torch.testing.assert_close(opt.grad_norm, ref_norm, rtol=1e-5, atol=0)
        clipped.append(ref_norm.item() > 1.0)
        opt.zero_grad(set_to_none=True)
    assert clipped == [True, False]
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-5 * r.abs().max().item())
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], rtol=1e-5, atol=1e-7)
        assert opt.state[p]["step"].item() == 2


def test_buckets_dtype_codes_and_alignment(fake_cuda: FakeExtension) -> None:
    """Two buckets (fp32; bf16 with master copy and stochastic rounding): 2 + 1 + 2 launches, the header's dtype
    codes, and a bucket holding a param that is not 16-byte aligned runs without vector accesses."""
    fp32 = lora_like(5)
    bf16 = lora_like(4, torch.bfloat16, seed=1)
    base = torch.zeros(65)
    misaligned = nn.Parameter(base[1:])  # storage offset 1: 4 bytes past an aligned address
    assert misaligned.data_ptr() % 16 != 0
    opt = FusedAdamW([{"params": fp32 + [misaligned]},
                      {"params": bf16, "master_weights": True, "stochastic_rounding": True}],
                     lr=1e-3, max_grad_norm=1.0, seed=3)
    set_grads(fp32 + [misaligned] + bf16, 0)
    opt.step()
    assert dict(fake_cuda.launches) == {"sum_squares": 2, "finalize": 1, "update": 2}
    updates = [args for name, args in fake_cuda.calls if name == "update"]
    assert updates == [
        {"param_dtype": 0, "grad_dtype": 0, "master": False, "stochastic": False, "vectorized": False},
        {"param_dtype": 2, "grad_dtype": 2, "master": True, "stochastic": True, "vectorized": True},
    ]
    assert [args for name, args in fake_cuda.calls if name == "finalize"] == [{"tensors": 10}]
    for p in bf16:
        assert torch.equal(opt.state[p]["step"], torch.tensor(1.0))
