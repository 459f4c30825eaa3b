"""bench/gpu_run.sh, the script that spends a lent GPU's minutes, works before it meets a GPU: run on CPU with a
stand-in nvidia-smi, it skips the install of a checkout that is installed already, runs a stage into OUTDIR (results
JSON and Markdown, device.txt, run.log), skips stages once its time budget is spent and refuses unknown stages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_run.sh"


@pytest.fixture
def fake_gpu_path(tmp_path: Path) -> dict[str, str]:
    """PATH with this interpreter's directory first (its ``python3``: a venv's, so not a symlink elsewhere, which
    would lose the venv) and an ``nvidia-smi`` that names a made-up device."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Stand-in GPU, 0.0, 0 MiB'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMELM_", "PYTEST_"))}
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), str(bin_dir), env["PATH"]))
    return env


def run_script(env: dict[str, str], out: Path, *stages: str, budget: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), *stages], env={**env, "LAMELM_GPU_BUDGET_S": str(budget)},
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_a_stage_runs_into_outdir(fake_gpu_path: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_script(fake_gpu_path, out, "swiglu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "install skipped" in (out / "install.log").read_text()
    assert (out / "device.txt").read_text().startswith("Stand-in GPU")
    log = (out / "run.log").read_text()
    assert "== swiglu (at most" in log
    assert re.search(r"== swiglu: exit 0 after \d+s \(\d+s of the budget left\)", log)
    (results,) = out.glob("*.json")
    payload = json.loads(results.read_text())
    assert {row["suite"] for row in payload["results"]} == {"swiglu"}
    assert results.with_suffix(".md").exists()


def test_spent_budget_skips_and_unknown_stage_is_refused(fake_gpu_path: dict[str, str], tmp_path: Path) -> None:
    skipped = run_script(fake_gpu_path, tmp_path / "a", "ce", budget=10)
    assert skipped.returncode == 1
    assert "== ce: skipped, the time budget is spent" in (tmp_path / "a" / "run.log").read_text()
    unknown = run_script(fake_gpu_path, tmp_path / "b", "warp-speed")
    assert unknown.returncode == 2 and "unknown stage warp-speed" in unknown.stdout


def test_the_usage_and_the_refusal_name_every_stage() -> None:
    """A stage added to the script's ``case`` is named where a user looks for it: its usage line and its answer to an
    unknown stage (both list every stage, and only stages)."""
    text = SCRIPT.read_text()
    cases = text.split("case $name in")[1].split("esac")[0]
    stages = {name.strip() for label in re.findall(r"^ {4}([a-z0-9| -]+)\)", cases, re.MULTILINE)
              for name in label.split("|")}
    usage = text.split("usage: bench/gpu_run.sh OUTDIR")[1].split("}")[0]
    known = text.split("KNOWN=(")[1].split(")")[0]  # what every stage is checked against, and the refusal lists
    assert "compile" in stages
    assert set(re.findall(r"[a-z0-9-]+", usage)) == stages
    assert set(re.findall(r"[a-z0-9-]+", known)) == stages


def test_without_a_gpu_or_with_an_unknown_stage_nothing_runs(fake_gpu_path: dict[str, str], tmp_path: Path) -> None:
    """No nvidia-smi: refused before the install (which would re-point the checkout's editable install) and before
    any stage; an unknown stage after known ones: refused before the known ones spend the budget."""
    failing = tmp_path / "no-gpu-bin"
    failing.mkdir()
    (failing / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices were found'\nexit 9\n")
    (failing / "nvidia-smi").chmod(0o755)
    no_gpu = {**fake_gpu_path, "PATH": os.pathsep.join((str(failing), fake_gpu_path["PATH"]))}
    refused = run_script(no_gpu, tmp_path / "a", "swiglu")
    assert refused.returncode == 1 and "no GPU here" in refused.stdout
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["device.txt"]
    late = run_script(fake_gpu_path, Path(os.path.relpath(tmp_path / "b", ROOT)), "swiglu", "warp-speed")
    assert late.returncode == 2 and "unknown stage warp-speed: choose from tests convergence" in late.stdout
    assert not (tmp_path / "b" / "run.log").exists()
