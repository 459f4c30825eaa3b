"""The backend switch: what each request resolves to on CPU tensors, and clear errors instead of fallbacks."""

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
