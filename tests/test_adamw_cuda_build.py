"""csrc/ must keep compiling even where it cannot run (CPU CI): nvcc builds the kernels, the host compiler builds
the torch binding, and the JIT path finds the sources."""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from lamelm_fast.ops import dispatch

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CI installs the CUDA toolkit to compile csrc)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile_without_warnings_or_local_memory(tmp_path: Path, arch: str) -> None:
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "csrc/ has no .cu files"
    for source in sources:
        result = subprocess.run(
            [_nvcc(), "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xcompiler=-Wall,-Wextra", "--Werror=all-warnings",
             "-Xptxas=-v", str(source), "-o", str(tmp_path / f"{source.stem}.o")],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        # No local memory: no spills, and no call (pow()...) that saves live registers on the stack.
        frames = re.findall(r"(\d+) bytes stack frame", result.stderr)
        assert frames and all(frame == "0" for frame in frames), result.stderr[-4000:]


def _ptx_entries(text: str) -> dict[str, str]:
    """Kernel name (mangled) -> its PTX body."""
    parts = re.split(r"^\.(?:visible \.)?entry (\S+)\(", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CI installs the CUDA toolkit to compile csrc)")
def test_adamw_kernels_use_global_vector_accesses(tmp_path: Path) -> None:
    """Pointers read from the device tables must still give global (not generic) loads and stores, 16-byte vectors
    of fp32 (4 x 16-bit for bf16/fp16) in the vectorized variants (template flag kVec = true, mangled ``Lb1E``)."""
    ptx = tmp_path / "adamw.ptx"
    result = subprocess.run([_nvcc(), "-ptx", "-std=c++17", "-O3", "-arch=sm_90", str(CSRC / "adamw.cu"), "-o",
                             str(ptx)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    entries = _ptx_entries(ptx.read_text())
    sums = {name: body for name, body in entries.items() if "sum_squares_kernel" in name}
    updates = {name: body for name, body in entries.items() if "adamw_update_kernel" in name}
    assert len(sums) == 3 * 2 and len(updates) == 9 * 2 and any("finalize_kernel" in name for name in entries)
    vector = r"\bld\.global(?:\.nc)?\.v4\.(?:f32|u16|b16)"
    for name, body in {**sums, **updates}.items():
        if "Lb1E" in name:
            assert re.search(vector, body), name
        else:
            assert not re.search(r"\.v4\.", body), name
    for name, body in updates.items():
        # exp_avg, exp_avg_sq and the param go through global stores (the optional master copy may stay generic).
        assert len(re.findall(r"\bst\.global\.", body)) >= 3, name
        if "Lb1E" in name:
            assert re.search(r"\bst\.global\.v4\.f32", body), name


def _binding_includes() -> list[str] | None:
    from torch.utils.cpp_extension import include_paths

    paths = [*include_paths(), sysconfig.get_paths()["include"]]
    have_torch = any((Path(p) / "torch" / "extension.h").exists() for p in paths)
    have_python = any((Path(p) / "Python.h").exists() for p in paths)
    return [f"-I{p}" for p in paths] if have_torch and have_python else None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
@pytest.mark.skipif(_binding_includes() is None,
                    reason="torch's C++ headers or Python.h are missing, so the pybind/torch binding cannot be checked")
def test_binding_compiles_against_torch_headers(tmp_path: Path) -> None:
    for source in sorted(CSRC.glob("*.cpp")):
        result = subprocess.run(
            ["g++", "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-DTORCH_EXTENSION_NAME=_C",
             *_binding_includes(), f"-I{CSRC}", str(source)],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        # Warnings from torch's own headers are theirs; ours must have none.
        assert f"{source.name}:" not in result.stderr.replace(f"from {source}", ""), result.stderr[-4000:]


def test_jit_build_finds_the_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dispatch.CSRC_DIR == CSRC
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: calls.append(kwargs) or "module")
    assert dispatch.jit_build_extension() == "module"
    assert {Path(s).name for s in calls[0]["sources"]} >= {"adamw.cu", "bindings.cpp"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_no_extension_and_no_jit_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.CUDA_JIT_ENV_VAR, "1")
    dispatch.cuda_extension.cache_clear()
    try:
        assert dispatch.cuda_extension() is None
    finally:
        dispatch.cuda_extension.cache_clear()
