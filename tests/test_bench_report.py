"""bench/report.py over the results of one GPU session, which records its suites over several device calls (each
call a run of its own in the day's file): the report and the README block show every suite from its latest run, not
the latest run alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report_under_test", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(date: str, commit: str, suite: str, ratio: float, device: str = "Test GPU") -> dict:
    return {"device": device, "date": date, "commit": commit, "versions": {"torch": "9.9"}, "peaks": {},
            "results": [{"suite": suite, "tokens": 17, "lamelm_ms": 1.0, "eager_ms": ratio,
                         "time_vs_eager": 1 / ratio}]}


def test_every_suite_comes_from_its_latest_run(tmp_path: Path) -> None:
    report = _report_module()
    runs = [_run("2026-11-20T01:00:00", "aaaaaaaaaaaa", "ce", 3.0),  # superseded by the third run
            _run("2026-11-23T06:00:00", "bbbbbbbbbbbb", "adamw", 5.0),
            _run("2026-11-23T06:10:00", "bbbbbbbbbbbb", "ce", 7.0),
            _run("2026-11-23T06:20:00", "cccccccccccc", "rope", 11.0, device="cpu")]  # CPU runs stay out of README
    (tmp_path / "gpu-2026-11-20.json").write_text(json.dumps(runs[0]))
    (tmp_path / "gpu-2026-11-23.json").write_text(json.dumps({"runs": runs[1:]}))
    loaded = report.load_runs(tmp_path)

    latest = report.latest_per_suite(loaded)
    assert {suite: run["date"] for suite, (run, _) in latest["Test GPU"].items()} == {
        "ce": "2026-11-23T06:10:00", "adamw": "2026-11-23T06:00:00"}

    block = report.readme_block(loaded)
    assert "*ce*" in block and "*adamw*" in block and "*rope*" not in block
    assert "Test GPU, 2026-11-23, commit bbbbbbbbbb" in block
    assert f"{1 / 7.0:.4g}" in block and f"{1 / 3.0:.4g}" not in block

    rendered = report.render(loaded, tmp_path)
    gpu_section = rendered.split("## Latest on Test GPU")[1].split("## Latest on cpu")[0]
    assert "### ce" in gpu_section and "### adamw" in gpu_section
    assert gpu_section.count("- Run ") == 2  # the two runs the section draws on, each once


def test_a_bad_results_file_or_directory_is_named_not_a_traceback(tmp_path: Path) -> None:
    import pytest

    report = _report_module()
    with pytest.raises(SystemExit, match="no such directory"):
        report.load_runs(tmp_path / "typo")  # would have written "No results recorded yet" over the README's block
    for name, text, problem in (("empty.json", "", "not a readable results file"),
                                ("list.json", "[1, 2]", "not a results file"),
                                ("nodate.json", json.dumps({"device": "x", "results": []}), "not a results file")):
        folder = tmp_path / name.removesuffix(".json")
        folder.mkdir()
        (folder / name).write_text(text)
        with pytest.raises(SystemExit, match=f"{name}: {problem}"):
            report.load_runs(folder)


def _harness_module():
    spec = importlib.util.spec_from_file_location("bench_harness_under_test", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up while being made)
    spec.loader.exec_module(module)
    return module


def test_a_peer_that_allocates_nothing_still_shows_what_ours_takes(tmp_path: Path) -> None:
    """An in-place peer (peak 0 MiB) has no memory ratio: the extra MiB of ours is a README column instead of the
    loss vanishing, and the plot keeps the zero on a symlog axis."""
    report, harness = _report_module(), _harness_module()
    row = {"suite": "rope", "tokens": 8, "lamelm_ms": 1.0, "lamelm_peak_mb": 80.0, "liger_ms": 2.0,
           "liger_peak_mb": 0.0}
    harness.compare_memory(row, "liger")
    assert "memory_vs_liger" not in row and row["memory_extra_mb_vs_liger"] == 80.0
    run = {"device": "Test GPU", "date": "2026-11-23T06:00:00", "commit": "c", "results": [row]}
    assert "memory_extra_mb_vs_liger" in report.readme_block([run])
    assert report.plot_suite("rope", [row], tmp_path).is_file()


def test_every_case_is_compiled_past_dynamos_recompile_limit() -> None:
    """The torch_compile columns of 16 cross-entropy cases came from one compiled function: past dynamo's limit of 8
    recompiles it ran eager, unsaid. Each case now compiles its own (counted by a backend that records each graph)."""
    import torch

    harness = _harness_module()
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(tuple(example_inputs[0].shape))
        return graph.forward

    for size in range(1, 11):  # 10 cases, each a new shape
        harness.compiled_for_one_case(lambda x: x * 2, backend=recording_backend)(torch.randn(size))
    assert graphs == [(size,) for size in range(1, 11)]
