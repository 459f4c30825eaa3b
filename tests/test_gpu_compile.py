"""Every GPU variant of the cross-entropy and 4-bit LoRA kernels compiles for Hopper (sm_90), without a GPU.

The interpreter that runs the other CPU tests never compiles a kernel; this runs tests/gpu_compile.py, which drives
the real launch functions with Triton's compiler aimed at sm_90 (each autotuner config too). The AdamW kernels
have their own compile test with access-width checks (tests/test_adamw_triton.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

SCRIPT = Path(__file__).with_name("gpu_compile.py")


@pytest.mark.slow
def test_kernels_compile_for_hopper() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today; set to silence Triton's notice about changing it
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = {entry["kernel"] for entry in report["compiled"]}
    assert kernels == {"_cross_entropy_rows_kernel", "_scale_inplace_kernel", "_dequantize_kernel", "_matmul_kernel",
                       "_gemv_kernel"}
    assert report["over_shared_limit"] == [], "configs that cannot load on an H100: shrink them or drop them"
    matmuls = [entry for entry in report["compiled"] if entry["kernel"] == "_matmul_kernel"]
    assert len(matmuls) >= 3 * 8  # three specialisations, every autotuner config of each
    # Hopper's warp-group MMA for the tiles wide enough for it (64+ rows), tensor cores for all.
    assert all(entry["wgmma"] or entry["mma"] for entry in matmuls)
    assert any(entry["wgmma"] for entry in matmuls)
