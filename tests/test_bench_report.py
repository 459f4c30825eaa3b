"""bench/report.py over the results of one GPU session, which records its suites over several device calls (each
call a run of its own in the day's file): the report and the README block show every suite from its latest run, not
the latest run alone."""

from __future__ import annotations

import importlib.util
import json
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
