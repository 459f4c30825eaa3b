"""Every GPU variant of the Triton kernels compiles for Ampere (sm_80) and Hopper (sm_90), without a GPU.

The interpreter that runs the other CPU tests never compiles a kernel; this runs tests/gpu_compile.py, which drives
the real launch functions with Triton's compiler aimed at the architecture (each autotuner config too), and checks
what the compiled code must have: tensor cores in the 4-bit GEMM and the LoRA backward's 16-bit products, 16-byte
accesses in AdamW's aligned variants, shared memory within the architecture's limit.
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
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_the_gpus_we_target(arch: int) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today; set to silence Triton's notice about changing it
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    compiled = report["compiled"]
    assert {entry["kernel"] for entry in compiled} == {
        "_cross_entropy_rows_kernel", "_scale_inplace_kernel", "_dequantize_kernel", "_matmul_kernel",
        "_gemv_kernel", "_sum_squares_kernel", "_finalize_kernel", "_adamw_kernel", "_rms_norm_forward_kernel",
        "_rms_norm_backward_kernel", "_swiglu_forward_kernel", "_swiglu_backward_kernel", "_rope_kernel",
        "_lora_output_grad_kernel"}
    assert report["over_shared_limit"] == [], "configs that cannot load on this GPU: shrink them or drop them"

    matmuls = [entry for entry in compiled if entry["kernel"] == "_matmul_kernel"]
    assert len(matmuls) >= 3 * 8  # three specialisations, every autotuner config of each
    assert all(entry["wgmma"] or entry["mma"] for entry in matmuls)  # tensor cores everywhere
    if arch == 90:  # Hopper's warp-group MMA for the tiles wide enough for it (64+ rows)
        assert any(entry["wgmma"] for entry in matmuls)

    norms = [entry for entry in compiled if entry["launch"].startswith("rms_norm")]
    assert len(norms) == 9 * 3 + 2
    for entry in norms:  # rows read and written with 16-byte accesses (every width here is a multiple of 8)
        assert {"ld.global.v4.b32", "st.global.v4.b32"} <= set(entry["accesses"]), entry

    swiglu = [entry for entry in compiled if entry["launch"].startswith("swiglu")]
    assert len(swiglu) == 3 * 2
    for entry in swiglu:  # 16 elements per thread: 16-byte accesses (element counts are multiples of 16 here)
        assert {"ld.global.v4.b32", "st.global.v4.b32"} <= set(entry["accesses"]), entry

    lora = [entry for entry in compiled if entry["launch"].startswith("lora_backward")]
    assert len(lora) == 2 * 2 * 2 * 2
    assert {entry["switches"]["GB_PARTIAL"] for entry in lora} == {"True", "False"}
    for entry in lora:  # 16-byte loads of the gradient's rows; tensor cores for 16-bit adapters (fp32: IEEE FMA)
        assert "ld.global.v4.b32" in entry["accesses"], entry
        if "adapter bf16" in entry["launch"]:
            assert entry["wgmma"] or entry["mma"], entry

    rope = [entry for entry in compiled if entry["launch"].startswith("rope")]
    assert len(rope) == 4 * 3 * 2
    for entry in rope:  # each token's heads read and written with 16-byte accesses, d = 80 included
        assert {"ld.global.v4.b32", "st.global.v4.b32"} <= set(entry["accesses"]), entry

    adamw = [entry for entry in compiled if entry["launch"].startswith("adamw")]
    assert len(adamw) == 4 + 1 + 7
    for entry in adamw:  # aligned variants: 16-byte loads of the gradient (and stores of the update)
        vectorized = "ld.global.v4.b32" in entry["accesses"]
        assert vectorized == entry["launch"].endswith(" aligned"), entry
        if entry["kernel"] == "_adamw_kernel" and vectorized:
            assert "st.global.v4.b32" in entry["accesses"], entry
