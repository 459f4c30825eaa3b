"""The backend switch: what each request resolves to on CPU tensors, and clear errors instead of fallbacks; the
4-bit matmul strategy setting."""

from __future__ import annotations

import pytest
import torch

from lamelm_fast.ops import dispatch

CPU = torch.device("cpu")


def test_auto_and_torch_take_the_reference_on_cpu() -> None:
    for has_cuda in (False, True):
        assert dispatch.resolve_backend(CPU, has_cuda=has_cuda, name="auto") == "torch"
        assert dispatch.resolve_backend(CPU, has_cuda=has_cuda, name="torch") == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend(CPU, name="triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend(CPU, name="triton")


def test_cuda_is_refused_on_cpu_tensors() -> None:
    for has_cuda in (False, True):
        with pytest.raises(dispatch.BackendUnavailable, match="CUDA"):
            dispatch.resolve_backend(CPU, has_cuda=has_cuda, name="cuda")


def test_environment_then_pinned_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.requested_backend() == "torch"
    with dispatch.use_backend("triton"):
        assert dispatch.requested_backend() == "triton"
    assert dispatch.requested_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="LAMELM_KERNELS"):
        dispatch.requested_backend()


def test_nf4_matmul_setting_reads_the_environment_and_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.NF4_MATMUL_ENV_VAR, raising=False)
    assert dispatch.requested_nf4_matmul() == "auto"
    monkeypatch.setenv(dispatch.NF4_MATMUL_ENV_VAR, "dequant")
    assert dispatch.requested_nf4_matmul() == "dequant"
    with dispatch.use_nf4_matmul("fused"):
        assert dispatch.requested_nf4_matmul() == "fused"
    assert dispatch.requested_nf4_matmul() == "dequant"
    dispatch.set_nf4_matmul("fused")
    try:
        assert dispatch.requested_nf4_matmul() == "fused"
    finally:
        dispatch.set_nf4_matmul(None)
    assert dispatch.requested_nf4_matmul() == "dequant"
    monkeypatch.setenv(dispatch.NF4_MATMUL_ENV_VAR, "cublas")
    with pytest.raises(ValueError, match=r"'cublas' \(from LAMELM_NF4_MATMUL\); choose from auto, fused, dequant"):
        dispatch.requested_nf4_matmul()
    with pytest.raises(ValueError, match="LAMELM_NF4_MATMUL"):
        with dispatch.use_nf4_matmul("fastest"):
            pass


def test_host_launch_arithmetic_equals_tritons() -> None:
    triton = pytest.importorskip("triton")
    from lamelm_fast.kernels._grid import cdiv, next_power_of_2

    for n in [0, 1, 2, 3, 63, 64, 65, 1000, 2**31 - 1, 2**31, 2**40 + 7]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in [1, 2, 7, 64, 128]:
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
