"""Render every recorded benchmark result into one Markdown report with plots.

    python bench/report.py [--results bench/results] [--out bench/results] [--readme README.md]

Reads each ``<device>-<date>.json`` written by ``pytest bench --benchmark-only`` (one run, or ``{"runs": [...]}``
when a day holds several), and writes ``REPORT.md`` (the latest run per device first, with its device, date,
commit and versions; then every run) and ``<suite>.png`` plots of time and peak memory against problem size.
``--readme`` also rewrites the README's block between ``README_START`` and ``README_END``: the ratios of the latest
GPU run (every ratio column, the ones where we lose included), so the README never quotes a number by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Per suite: the columns that identify a case (its size), and the measured columns worth a table.
SIZE_KEYS = ("projection", "direction", "activations", "hidden", "width", "vocab", "tokens", "variant", "case",
             "params", "tensors", "dtype", "shape", "seq_len", "seq", "batch", "steps", "heads", "kv_heads", "head_dim",
             "mean_length", "sequences", "cos_dtype", "weight_grad", "master_weights")
# Diagnostic suites (which of two strategies wins where): REPORT.md has them, the README's block would drown in them.
README_LEFT_OUT = ("nf4_matmul_strategy",)
README_START = "<!-- gpu-results: written by bench/report.py --readme -->"
README_END = "<!-- /gpu-results -->"


def load_runs(results: Path) -> list[dict[str, Any]]:
    """Every run in ``results``' JSON files; SystemExit naming the file and what is wrong with it (one bad file
    must not take the report down with a traceback, nor be skipped unsaid)."""
    if not results.is_dir():
        raise SystemExit(f"--results {results}: no such directory")
    runs = []
    for path in sorted(results.glob("*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: not a readable results file ({error})") from None
        file_runs = payload.get("runs", [payload]) if isinstance(payload, dict) else None
        if not isinstance(file_runs, list) or not all(
                isinstance(run, dict) and isinstance(run.get("date"), str) and isinstance(run.get("results"), list)
                and isinstance(run.get("device"), str) for run in file_runs):
            raise SystemExit(f"{path}: not a results file (expected a run with 'date', 'device' and 'results', or "
                             "{'runs': [...]} of them)")
        for run in file_runs:
            run["file"] = path.name
            runs.append(run)
    return sorted(runs, key=lambda run: run["date"])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")  # one table cell


def table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k, v in row.items() if k != "suite" and not isinstance(v, list)))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
    return lines


def _size_label(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={row[k]}" for k in SIZE_KEYS if k in row and k != "dtype")


def plot_suite(suite: str, rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Time (ms) and peak memory (MB) of each implementation per case, from the columns named ``<impl>_ms`` and
    ``<impl>_peak_mb``."""
    impls = sorted({k[:-3] for row in rows for k in row if k.endswith("_ms") and not k.startswith("matmul")})
    if not impls:
        return None
    figure = Figure(figsize=(max(6, len(rows) * 0.6), 7), layout="constrained")
    time_axes, memory_axes = figure.subplots(2, 1, sharex=True)
    positions = range(len(rows))

    def numbers(key: str) -> list[float]:  # "oom" and missing values are gaps in the line
        return [value if isinstance(value := row.get(key), (int, float)) else math.nan for row in rows]

    for axes, suffix, label in ((time_axes, "_ms", "time (ms)"), (memory_axes, "_peak_mb", "peak memory (MB)")):
        for impl in impls:
            axes.plot(positions, numbers(impl + suffix), marker="o", label=impl)
        values = [v for impl in impls for v in numbers(impl + suffix) if not math.isnan(v)]
        positive = [v for v in values if v > 0]
        if positive and len(positive) < len(values):  # a 0 (an in-place op's memory) would drop off a log axis
            axes.set_yscale("symlog", linthresh=min(positive))
        elif positive:
            axes.set_yscale("log")
        axes.set_ylabel(label)
    time_axes.legend()
    memory_axes.set_xticks(list(positions), [_size_label(row) for row in rows], rotation=60, ha="right",
                           fontsize=7)
    time_axes.set_title(suite)
    path = out / f"{suite}.png"
    FigureCanvasAgg(figure).print_png(path)
    return path


def latest_per_suite(runs: list[dict[str, Any]]) -> dict[str, dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]]:
    """Per device, per suite: the latest run (``runs`` sorted by date) that measured it, and its rows. One GPU session
    records its suites over several device calls, each a run of its own: the latest run alone would hide the rest."""
    latest: dict[str, dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]] = {}
    for run in runs:
        for suite in dict.fromkeys(row["suite"] for row in run["results"]):
            rows = [row for row in run["results"] if row["suite"] == suite]
            latest.setdefault(run["device"], {})[suite] = (run, rows)
    return latest


def render(runs: list[dict[str, Any]], out: Path) -> str:
    lines = ["# Benchmark results", "",
             "Written by `python bench/report.py` from the JSON files beside it; each file is one device and day, "
             "recorded by `pytest bench --benchmark-only` (see `bench/gpu_run.sh`). Ratios are ours / theirs: "
             "below 1 is faster (time) or smaller (memory); `speedup_*` above 1 is faster.", ""]
    if not runs:
        return "\n".join([*lines, "No results recorded yet.", ""])
    for device, suites in latest_per_suite(runs).items():
        lines += [f"## Latest on {device}", ""]
        for run in {id(run): run for run, _ in suites.values()}.values():
            versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v)
            peaks = run.get("peaks", {})
            measured = ", ".join(suite for suite, (r, _) in suites.items() if r is run)
            lines += [f"- Run {run['date'][:19]}, commit {run.get('commit')}: {measured}. {versions}."]
            if peaks:
                lines[-1] += (f" Measured peaks: {peaks.get('matmul_flops', 0) / 1e12:.3g} TFLOP/s "
                              f"{peaks.get('matmul_dtype', '')} matmul, "
                              f"{peaks.get('copy_bytes_per_second', 0) / 1e9:.0f} GB/s copy.")
        lines.append("")
        for suite, (run, rows) in suites.items():
            lines += [f"### {suite}", "", f"Run {run['date'][:19]}.", "", *table(rows), ""]
            plot = plot_suite(f"{device.replace(' ', '-')}-{suite}", rows, out)
            if plot is not None:
                lines += [f"![{suite}]({plot.name})", ""]
    lines += ["## All runs", ""]
    lines += [f"- {run['date'][:19]} {run['device']} commit {run.get('commit')} ({run['file']})" for run in runs]
    return "\n".join(lines) + "\n"


def _is_ratio(key: str) -> bool:
    return (key.startswith(("speedup_", "time_vs_", "memory_vs_", "memory_extra_mb_vs_"))
            or key.endswith(("_ratio", "_fraction")))


def readme_block(runs: list[dict[str, Any]]) -> str:
    """The README's results block: per suite, the latest GPU run of the latest GPU device that measured it, with its
    size columns, ratios and final losses."""
    gpu_runs = [run for run in runs if not run["device"].lower().startswith("cpu")]
    if not gpu_runs:
        return ("**Latest GPU results: none recorded yet.** The CPU runs only prove that the suite works; "
                "`bench/gpu_run.sh` records GPU numbers.")
    device = gpu_runs[-1]["device"]
    suites = latest_per_suite(gpu_runs)[device]
    used = [run for run in gpu_runs if any(run is r for r, _ in suites.values())]
    dates = ", ".join(dict.fromkeys(run["date"][:10] for run in used))
    commits = ", ".join(dict.fromkeys(str(run.get("commit"))[:10] for run in used))
    lines = [f"**Latest GPU results: {device}, {dates}, commit {commits}** "
             f"(every column: [bench/results/REPORT.md](bench/results/REPORT.md)). Ratios are ours / theirs for "
             "`time_vs_*` and `memory_*` (below 1 is better), theirs / ours for `speedup_*` (above 1 is better); "
             "`*_fraction` is the share of the device's measured peak.", ""]
    for suite, (_, rows) in suites.items():
        if suite in README_LEFT_OUT:
            continue
        rows = [{k: v for k, v in row.items() if k in SIZE_KEYS or k in ("in", "out") or _is_ratio(k)
                 or k.endswith("final_loss") or k.endswith("max_context")} for row in rows]
        lines += [f"*{suite}*", "", *table(rows), ""]
    return "\n".join(lines).rstrip()


def update_readme(path: Path, runs: list[dict[str, Any]]) -> None:
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path}: no results block; add the lines {README_START!r} and {README_END!r} where the "
                         "table belongs")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    path.write_text(f"{head}{README_START}\n{readme_block(runs)}\n{README_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).parent / "results"
    parser.add_argument("--results", type=Path, default=here)
    parser.add_argument("--out", type=Path, default=here)
    parser.add_argument("--readme", type=Path, help="also rewrite this README's results block")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(args.results)
    report = render(runs, args.out)
    (args.out / "REPORT.md").write_text(report, encoding="utf-8")
    print(f"wrote {args.out / 'REPORT.md'}")
    if args.readme is not None:
        update_readme(args.readme, runs)
        print(f"wrote the results block of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
