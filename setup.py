"""Builds the optional CUDA extension ``lamelm_fast._C`` from csrc/ when a CUDA toolkit and a CUDA build of
torch are present. Without them (CPU machines, CI) the package installs as pure Python."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup


def cuda_extensions() -> tuple[list, dict]:
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu")) + sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    if not sources or os.environ.get("LAMELM_NO_CUDA_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # torch not importable in the build environment: pure-Python install
        print("lamelm-fast: torch is not importable in this build environment (pip's build isolation), so the CUDA "
              "extension is not built; to build it: `pip install setuptools wheel && pip install "
              "--no-build-isolation -e .`", file=sys.stderr)
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    extension = CUDAExtension("lamelm_fast._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
