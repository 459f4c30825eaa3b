"""One switch picks the backend of every fused op: ``auto``, ``cuda``, ``triton`` or ``torch``.

``auto`` = the CUDA extension if it is built and the tensors are on a CUDA device, else Triton on a CUDA device,
else the torch reference. ``cuda`` insists on the extension for the ops that have a CUDA implementation and runs
the others with Triton. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is imported
(that is how CI runs the kernels). The choice comes from :func:`set_backend` / :func:`use_backend`, else the
environment variable ``LAMELM_KERNELS``, else ``auto``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "LAMELM_KERNELS"

_chosen: str | None = None


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on these tensors; the message says why and what to do."""


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (from {ENV_VAR} or --kernels); choose from "
                         f"{', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Pin the backend for the whole process (None: back to ``LAMELM_KERNELS`` / ``auto``)."""
    global _chosen
    _chosen = None if name is None else _check(name)


def requested_backend() -> str:
    return _chosen if _chosen is not None else _check(os.environ.get(ENV_VAR, "auto") or "auto")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    global _chosen
    previous, _chosen = _chosen, _check(name)
    try:
        yield
    finally:
        _chosen = previous


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


CUDA_JIT_ENV_VAR = "LAMELM_CUDA_JIT"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"  # present in a source checkout / editable install


def jit_build_extension(verbose: bool = False) -> ModuleType:
    """Compile csrc/ now with ``torch.utils.cpp_extension.load`` (cached in ``TORCH_EXTENSIONS_DIR``) and return it:
    the CUDA kernels for an install that setup.py did not build (needs nvcc and a CUDA build of torch)."""
    from torch.utils.cpp_extension import load

    sources = sorted(CSRC_DIR.glob("*.cu")) + sorted(CSRC_DIR.glob("*.cpp"))
    if not sources:
        raise BackendUnavailable(f"no CUDA sources in {CSRC_DIR}: JIT builds need a source checkout of lamelm-fast")
    return load(name="lamelm_fast_C", sources=[str(s) for s in sources], extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"], verbose=verbose)


@functools.cache
def cuda_extension() -> ModuleType | None:
    """The compiled ``lamelm_fast._C`` (built by setup.py when CUDA exists), else a JIT build of csrc/ when
    ``LAMELM_CUDA_JIT=1`` and CUDA is available, else None."""
    try:
        return importlib.import_module("lamelm_fast._C")
    except ImportError:
        pass
    if os.environ.get(CUDA_JIT_ENV_VAR) == "1" and torch.cuda.is_available():
        return jit_build_extension()
    return None


def resolve_backend(device: torch.device, *, has_cuda: bool = False, name: str | None = None) -> str:
    """The backend an op runs with on tensors of ``device``: ``"cuda"``, ``"triton"`` or ``"torch"``.

    ``has_cuda`` says whether the op has a CUDA implementation at all. An explicit request that cannot run raises
    :class:`BackendUnavailable` (never a silent fallback: benchmarks and tests must measure what they name).
    """
    wanted = _check(name) if name is not None else requested_backend()
    on_cuda = device.type == "cuda"
    if wanted == "torch":
        return "torch"
    if wanted == "auto":
        if on_cuda and has_cuda and cuda_extension() is not None:
            return "cuda"
        return "triton" if on_cuda and triton_available() else "torch"
    if wanted == "cuda" and has_cuda:
        if not on_cuda or cuda_extension() is None:
            raise BackendUnavailable("the CUDA backend needs CUDA tensors and the compiled extension "
                                     "lamelm_fast._C (pip install -e . on a machine with nvcc and a CUDA torch)")
        return "cuda"
    if wanted == "cuda" and not on_cuda:
        raise BackendUnavailable("--kernels cuda needs CUDA tensors; use --kernels auto or torch on CPU")
    if not triton_available():
        raise BackendUnavailable("the Triton backend needs the triton package: pip install triton")
    if not on_cuda and not triton_interpreted():
        raise BackendUnavailable("Triton kernels on CPU tensors run only under TRITON_INTERPRET=1 (set before "
                                 "triton is imported); use --kernels torch or auto on CPU")
    return "triton"
