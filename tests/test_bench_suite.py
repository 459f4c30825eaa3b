"""The benchmark suite runs on CPU (small sizes) so it never rots: `pytest bench --benchmark-only` passes, writes a
results file with every suite, and `bench/report.py` renders it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# End-to-end cases that run no code on CPU that another case leaves out (~25 s of CI's budget): the full fine-tune's
# step time breakdown (the profiling is [qlora]'s, both trainers' full fine-tunes test_trainer_vs_hf_trainer[full]'s),
# the full fine-tune without checkpointing (its bf16 weights are a GPU's only: on CPU, [qlora]'s code over the full
# fine-tunes above) and the long checkpointing policy ([short]'s code at 4x the length). Every suite still records
# rows, every benchmark file runs.
SAME_CODE_AS_ANOTHER_CASE = ("test_step_time_breakdown[full]", "test_without_checkpointing[full]",
                             "test_checkpointing_policy[long]")


@pytest.mark.slow
def test_benchmarks_run_on_cpu_and_the_report_renders(tmp_path: Path) -> None:
    # 8 trainer steps per end-to-end run (20 by default on CPU): enough for its rows, ~20 s less of CI's budget.
    env = {**os.environ, "LAMELM_BENCH_RESULTS": str(tmp_path), "PYTHONSAFEPATH": "1", "LAMELM_BENCH_STEPS": "8"}
    completed = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p",
                                "no:cacheprovider", *(f"--deselect=bench/test_end_to_end.py::{case}" for case in
                                                      SAME_CODE_AS_ANOTHER_CASE)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    (results,) = tmp_path.glob("*.json")
    payload = json.loads(results.read_text())
    suites = {row["suite"] for row in payload["results"]}
    benchmark_files = sorted(p.stem for p in (ROOT / "bench").glob("test_*.py"))
    assert {"fused_linear_cross_entropy", "end_to_end"} <= suites
    assert len(suites) >= len(benchmark_files)  # every benchmark file recorded at least one suite
    assert payload["peaks"]["matmul_flops"] > 0 and payload["commit"]
    for row in payload["results"]:  # each measurement of ours sits beside its reference, with their ratio
        assert any(key.startswith(("time_vs_", "speedup_", "memory_vs_", "bandwidth_")) for key in row), row
    rendered = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(tmp_path),
                               "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    report = (tmp_path / "report" / "REPORT.md").read_text()
    assert "fused_linear_cross_entropy" in report and "end_to_end" in report
    for png in (tmp_path / "report").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The README block quotes GPU runs only: with CPU results alone it says so; given a run under another device
    # name (this CPU run, relabelled to exercise the renderer) it lists that run's ratios and where it came from.
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    render_readme = [sys.executable, str(ROOT / "bench" / "report.py"), "--out", str(tmp_path / "report"),
                     "--readme", str(readme), "--results"]
    assert subprocess.run([*render_readme, str(tmp_path)], capture_output=True, timeout=120).returncode == 0
    assert "Latest GPU results: none recorded yet" in readme.read_text()
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    (relabelled / "gpu.json").write_text(json.dumps({**payload, "device": "Relabelled CPU run"}))
    assert subprocess.run([*render_readme, str(relabelled)], capture_output=True, timeout=120).returncode == 0
    text = readme.read_text()
    block = text.split("<!-- gpu-results")[1].split("<!-- /gpu-results -->")[0]
    assert f"Relabelled CPU run, {payload['date'][:10]}, commit {payload['commit'][:10]}" in block
    assert "*end_to_end*" in block and "speedup_tokens_per_second" in block and "time_vs_eager" in block
    assert text.replace(block, "") == (ROOT / "README.md").read_text().replace(
        (ROOT / "README.md").read_text().split("<!-- gpu-results")[1].split("<!-- /gpu-results -->")[0], "")


def test_results_file_keeps_every_row_as_it_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run cut short keeps what it measured: the file is complete after each row; a second run that day is added."""
    import importlib.util

    monkeypatch.setenv("LAMELM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", ROOT / "bench" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    rows: list[dict] = []
    first = conftest._ResultsFile()
    for value in (1.5, 2.5):
        rows.append({"suite": "s", "x_ms": value})
        first.write(rows)
        (path,) = tmp_path.glob("*.json")
        assert [row["x_ms"] for row in json.loads(path.read_text())["results"]] == [row["x_ms"] for row in rows]
    second = conftest._ResultsFile()
    second.write([{"suite": "s", "x_ms": 9.0}])
    runs = json.loads(path.read_text())["runs"]
    assert [[row["x_ms"] for row in run["results"]] for run in runs] == [[1.5, 2.5], [9.0]]
    assert "| 9 |" in path.with_suffix(".md").read_text()


def test_a_failing_peer_is_recorded_and_ours_still_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose API moved (or a torch.compile that meets another Triton) must not take our row down with it."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import harness

    def broken() -> None:
        raise TypeError("apply() takes 4 positional arguments but 5 were given")

    row: dict = {}
    work = torch.randn(64, 64)
    harness.measure_against(row, {"lamelm": lambda: work @ work, "eager": lambda: work @ work, "liger": broken},
                            torch.device("cpu"), warmup=1, repeats=3)
    assert isinstance(row["lamelm_ms"], float) and "time_vs_eager" in row
    assert row["liger_ms"] == "error" and row["liger_error"].startswith("TypeError: apply()")
    assert "time_vs_liger" not in row

    def ours_broken() -> None:
        raise RuntimeError("our kernel failed")

    with pytest.raises(RuntimeError, match="our kernel failed"):
        harness.measure_against({}, {"lamelm": ours_broken}, torch.device("cpu"), warmup=1, repeats=1)


def test_step_host_work_counts_our_launches_per_step() -> None:
    """bench/step_host_work.py (the host-work counts of bench/NOTES-end-to-end.md) keeps working, and counts what a
    step launches: with 2 decoder layers, each 4-bit projection's dequantization three times per step (forward,
    checkpointing's recompute, backward) and each adapter's output-gradient kernel once."""
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "step_host_work.py"), "--layers", "2", "--steps",
                                "2", "--trainers", "lamelm"], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = completed.stdout.strip().splitlines()[-1]
    ops, launches = (float(part.split()[0]) for part in line.split(":")[1].split(",")[:2])
    launching = float(line.split("(")[1].split()[0])  # the ATen ops that are neither views nor allocations
    assert ops > 100 and 0 < launching < ops / 2, line
    dequantizations, output_grads = 2 * 7 * 3, 2 * 7  # 7 projections per layer
    assert launches > dequantizations + output_grads, line
