"""Benchmark session: the device, its measured peaks, and the results file (rewritten after every result).

``pytest bench --benchmark-only`` on a GPU writes ``bench/results/<device>-<date>.json`` and a Markdown table beside
it; on CPU (small sizes, so the suite never rots) results go to ``$LAMELM_BENCH_RESULTS`` only if that is set.
"""

from __future__ import annotations

import datetime
import importlib.metadata
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

from lamelm_fast.metrics.atomic import atomic_write  # noqa: E402

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
    # From the installed distributions' metadata: liger_kernel has no __version__.
    for name, distribution in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                               ("bitsandbytes", "bitsandbytes"), ("liger_kernel", "liger-kernel")):
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:  # absent, or installed under another name (pytorch-triton)
            versions[name] = getattr(sys.modules.get(name), "__version__", None)
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
            cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float)
                     else str(row.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


class _ResultsFile:
    """This session's results file, rewritten after every recorded row: a run cut short (the device command's time
    limit, a crash in a kernel) keeps what it measured. A second session on the same day adds a run to the file."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.previous: list[dict[str, Any]] = []
        self.header: dict[str, Any] = {}

    def _open(self) -> bool:
        on_gpu = torch.cuda.is_available()
        target = os.environ.get("LAMELM_BENCH_RESULTS")
        if target is None and not on_gpu:
            return False
        directory = Path(target) if target else RESULTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name() if on_gpu else f"cpu-{platform.machine()}"
        stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{datetime.date.today().isoformat()}"
        self.path = directory / f"{stem}.json"
        if self.path.exists():
            previous = json.loads(self.path.read_text())
            self.previous = previous["runs"] if "runs" in previous else [previous]
        device = torch.device("cuda" if on_gpu else "cpu")
        self.header = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "commit": _commit(), "versions": _versions(), "peaks": harness.device_peaks(device)}
        return True

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.path is None and not self._open():
            return
        runs = [*self.previous, {**self.header, "results": rows}]
        payload = runs[0] if len(runs) == 1 else {"runs": runs}
        markdown = "\n\n".join(f"# {run['device']} {run['date']} (commit {run['commit']})\n\n"
                               f"{_markdown(run['results'])}" for run in runs)
        for path, text in ((self.path, json.dumps(payload, indent=2) + "\n"), (self.path.with_suffix(".md"), markdown)):
            with atomic_write(path) as handle:
                handle.write(text.encode())


def pytest_sessionstart(session: pytest.Session) -> None:
    results = _ResultsFile()
    harness.ON_RECORD.append(lambda: results.write(harness.RESULTS))
