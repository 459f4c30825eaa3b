"""Process-wide kernel settings: the backend of every fused op, and how 4-bit LoRA matmuls multiply.

Backend: ``auto``, ``cuda``, ``triton`` or ``torch``. ``auto`` = the CUDA extension if it is built and the tensors
are on a CUDA device, else Triton on a CUDA device, else the torch reference. ``cuda`` insists on the extension for
the ops that have a CUDA implementation and runs the others with Triton. ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported (that is how CI runs the kernels). The choice comes from
:func:`set_backend` / :func:`use_backend`, else the environment variable ``LAMELM_KERNELS``, else ``auto``.

4-bit matmul strategy (the Triton backend of the QLoRA projections, :mod:`lamelm_fast.ops.nf4_matmul`): ``auto``,
``fused`` or ``dequant``, from :func:`set_nf4_matmul` / :func:`use_nf4_matmul`, else ``LAMELM_NF4_MATMUL``, else
``auto``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType

import torch


class Setting:
    """One process-wide choice among fixed names: pinned from Python (:meth:`set`, :meth:`use`), else an environment
    variable, else the first name. Read (and checked) at every use, so a bad value fails at the first op that needs
    it, with the variable and the allowed values in the message."""

    def __init__(self, env_var: str, choices: tuple[str, ...], what: str, flag: str | None = None) -> None:
        self.env_var, self.choices, self.what, self.flag = env_var, choices, what, flag
        self._chosen: str | None = None

    def check(self, name: str) -> str:
        if name not in self.choices:
            source = self.env_var if self.flag is None else f"{self.env_var} or {self.flag}"
            raise ValueError(f"unknown {self.what} {name!r} (from {source}); choose from {', '.join(self.choices)}")
        return name

    def set(self, name: str | None) -> None:
        self._chosen = None if name is None else self.check(name)

    def requested(self) -> str:
        if self._chosen is not None:
            return self._chosen
        return self.check(os.environ.get(self.env_var, "") or self.choices[0])

    def pinned(self) -> str | None:
        """The name pinned from Python (:meth:`set`, :meth:`use`), if any."""
        return self._chosen

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        previous, self._chosen = self._chosen, self.check(name)
        try:
            yield
        finally:
            self._chosen = previous


BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "LAMELM_KERNELS"
_backend = Setting(ENV_VAR, BACKENDS, "kernel backend", flag="--kernels")

NF4_MATMUL_STRATEGIES = ("auto", "fused", "dequant")
NF4_MATMUL_ENV_VAR = "LAMELM_NF4_MATMUL"
_nf4_matmul = Setting(NF4_MATMUL_ENV_VAR, NF4_MATMUL_STRATEGIES, "4-bit matmul strategy")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on these tensors; the message says why and what to do."""


def _check(name: str) -> str:
    return _backend.check(name)


def set_backend(name: str | None) -> None:
    """Pin the backend for the whole process (None: back to ``LAMELM_KERNELS`` / ``auto``)."""
    _backend.set(name)


def requested_backend() -> str:
    return _backend.requested()


def use_backend(name: str) -> AbstractContextManager[None]:
    """Pin the backend inside a ``with`` block (process-wide, as :func:`set_backend`: not per thread)."""
    return _backend.use(name)


def pinned_backend() -> str | None:
    """The backend pinned from Python (:func:`set_backend`, :func:`use_backend`), if any."""
    return _backend.pinned()


def set_nf4_matmul(name: str | None) -> None:
    """Pin the 4-bit matmul strategy for the whole process (None: back to ``LAMELM_NF4_MATMUL`` / ``auto``)."""
    _nf4_matmul.set(name)


def requested_nf4_matmul() -> str:
    return _nf4_matmul.requested()


def use_nf4_matmul(name: str) -> AbstractContextManager[None]:
    """Pin the 4-bit matmul strategy inside a ``with`` block."""
    return _nf4_matmul.use(name)


def active_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs its lower-precision ops in on this device, None where autocast is off: the fused ops
    follow it as the eager ops they replace would."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, at import: torch.compile would trace a cached function's body, and find_spec breaks its graph.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


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
