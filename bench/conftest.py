"""Benchmark session: the device, its measured peaks, and the results file written at the end.

``pytest bench --benchmark-only`` on a GPU writes ``bench/results/<device>-<date>.json`` and a Markdown table beside
it; on CPU (small sizes, so the suite never rots) results go to ``$LAMELM_BENCH_RESULTS`` only if that is set.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if not torch.cuda.is_available():
        # The CPU sizes are tiny: with several threads, thread barriers on a busy machine cost more than the math.
        torch.set_num_threads(1)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def peaks(device: torch.device) -> dict[str, float]:
    return harness.device_peaks(device)


def _versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # absent or broken: recorded as absent
            versions[name] = None
    return versions


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    for suite in dict.fromkeys(row["suite"] for row in rows):
        suite_rows = [row for row in rows if row["suite"] == suite]
        keys = list(dict.fromkeys(key for row in suite_rows for key in row if key != "suite"))
        lines += [f"## {suite}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in suite_rows:
            cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not harness.RESULTS:
        return
    on_gpu = torch.cuda.is_available()
    target = os.environ.get("LAMELM_BENCH_RESULTS")
    if target is None and not on_gpu:
        return
    directory = Path(target) if target else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if on_gpu else f"cpu-{platform.machine()}"
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{datetime.date.today().isoformat()}"
    device = torch.device("cuda" if on_gpu else "cpu")
    payload = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "commit": _commit(), "versions": _versions(), "peaks": harness.device_peaks(device),
               "results": harness.RESULTS}
    path = directory / f"{stem}.json"
    if path.exists():  # a second run the same day adds to the file instead of overwriting the first
        previous = json.loads(path.read_text())
        runs = previous["runs"] if "runs" in previous else [previous]
        payload = {"runs": [*runs, payload]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    runs = payload.get("runs", [payload])
    (directory / f"{stem}.md").write_text("\n\n".join(
        f"# {run['device']} {run['date']} (commit {run['commit']})\n\n{_markdown(run['results'])}" for run in runs))
