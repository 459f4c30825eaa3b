"""Where a run's numbers go: the console (table + progress bar, or JSON lines), the run directory's files
(metrics.jsonl, training_metrics.json, summary.json, plots) and optional trackers (TensorBoard, W&B).

Rows arrive as plain Python numbers: the device is read only at logging steps, by the caller. metrics.jsonl gets each
row as it comes; training_metrics.json, rewritten whole, lags it by at most ``METRICS_REWRITE_SECONDS`` between
evaluations (more only where a rewrite itself takes long) and is complete after each evaluation, flush() and close().
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any, TextIO

from lamelm_fast.metrics.atomic import atomic_write

# (metrics key, column title, width, format spec)
COLUMNS = (("step", "Step", 7, "d"), ("loss", "Loss", 9, ".4f"), ("grad_norm", "Grad Norm", 10, ".4f"),
           ("learning_rate", "Learning Rate", 14, ".3e"), ("epoch", "Epoch", 7, ".3f"),
           ("tokens_per_second", "Tok/s", 9, ".0f"), ("gpu_util", "GPU%", 5, ".0f"), ("memory_gb", "Mem(GB)", 8, ".2f"))
# training_metrics.json can only be rewritten whole (~0.35 s at 100k rows), so train rows rewrite it at most this often
# (evaluations, the summary, flush() and close() always do) ...
METRICS_REWRITE_SECONDS = 10.0
# ... and no sooner than this many times the last rewrite took: a long run logging every step spends at most 2% of its
# time on it, however long its history grows.
_METRICS_REWRITE_COST_RATIO = 50.0


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def write_json_atomic(path: Path, value: Any) -> None:
    _write_text_atomic(path, json.dumps(value, indent=2))


def _format(value: Any, width: int, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-' if value is None else str(value):>{width}}"
    return f"{value:>{width}{spec}}"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


class RowPacker:
    """Logged rows as a checkpoint carries them: metrics.jsonl's lines in gzip, compressed as they are logged (~10 us
    a row). Each checkpoint holds every row so far, so taking them must not compress them all again (~1.5 s at 100k
    rows): it copies what is compressed already and ends a copy of the compressor (milliseconds)."""

    def __init__(self) -> None:
        self._compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # +16: a gzip header
        self._packed = bytearray()

    def add(self, lines: str) -> None:
        self._packed += self._compressor.compress(lines.encode("utf-8"))

    def packed(self) -> bytes:
        return bytes(self._packed) + self._compressor.copy().flush()


CHECKPOINT_ROWS_FILE = "metrics.jsonl.gz"  # a checkpoint's copy of the rows logged up to its step


def unpacked_text(packed: bytes) -> str:
    """The JSON lines that :class:`RowPacker` packed, or zlib-compressed as the previous version's training state
    held them."""
    return zlib.decompress(packed, 32 + zlib.MAX_WBITS).decode("utf-8")  # +32: a gzip or a zlib header


def unpack_rows(packed: bytes) -> list[dict[str, Any]]:
    """The rows of :func:`unpacked_text`."""
    return [json.loads(line) for line in unpacked_text(packed).splitlines()]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _segments_line(summary: dict[str, Any]) -> list[str]:
    """For a resumed run, which figures cover the whole run and which only this process."""
    if (summary.get("segments") or 1) <= 1:
        return []
    steps, first = summary["steps"], summary["segment_first_step"]
    whole = (f"the figures cover steps 1-{steps}, the runtime adding up each segment's own time"
             if summary.get("tokens") is not None else  # resumed from a checkpoint that did not count them
             f"tokens, samples and time before step {first} were not counted, earlier losses, evaluations and "
             "warnings are those metrics.jsonl kept")
    return [f"  (resumed at step {first - 1}, {summary['segments']} segments: {whole}; the segment figures, mfu and "
            f"peak memory are this process's, steps {first}-{steps})"]


def training_metrics(history: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Aligned arrays over every logged step; null where a step has no train or no eval value."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in history:
        if row["type"] in ("train", "eval"):
            by_step.setdefault(row["step"], {}).update(row)
    steps = sorted(by_step)
    return {"steps": steps,
            "train_loss": [by_step[s].get("loss") for s in steps],
            "val_loss": [by_step[s].get("val_loss") for s in steps],
            "learning_rate": [by_step[s].get("learning_rate") for s in steps],
            "epochs": [by_step[s].get("epoch") for s in steps]}


class _Trackers:
    """TensorBoard and W&B, each only when asked for; a missing package is a clear error, not a crash."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any]) -> None:
        from lamelm_fast.train.config import check_trackers

        self.tensorboard = self.wandb = None
        check_trackers(names)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "lamelm-fast"), dir=str(run_dir),
                                    config=config)

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        values = {f"{prefix}/{k}": v for k, v in row.items()
                  if k not in ("type", "step") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, global_step=row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, *, quiet: bool = False, log_format: str = "table",
                 resume_step: int | None = None, resume_rows: list[dict[str, Any]] | None = None,
                 report_to: list[str] | None = None, config: dict[str, Any] | None = None,
                 stream: TextIO | None = None) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.quiet = quiet
        self.json_lines = log_format == "json"
        self.stream = stream or sys.stdout
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / "metrics.jsonl"
        # A resumed run continues its metrics (and its curves) from the checkpoint's step, with the rows up to it that
        # the checkpoint carries (``resume_rows``), in whichever directory it resumes. A checkpoint of an older version
        # carries none (None): the rows this directory's metrics.jsonl holds stand in. Rows logged after the step by
        # the interrupted run (and a line a crash cut short) are dropped, as those steps run again. A new run in the
        # same directory starts afresh.
        self.history: list[dict[str, Any]] = []
        self._metrics_due = -math.inf  # when a train row next rewrites training_metrics.json
        self._metrics_stale = False  # rows logged since its last rewrite
        self._packer = RowPacker()
        if resume_step is not None:
            if resume_rows is None:
                resume_rows = _read_rows(metrics_path) if metrics_path.is_file() else []
            self.history = [row for row in resume_rows if row.get("step", 0) <= resume_step]
            lines = _jsonl(self.history)
            _write_text_atomic(metrics_path, lines)
            self._packer.add(lines)
            if self.history:  # not the interrupted run's arrays, should this run stop before its first row
                self._write_training_metrics()
        self._metrics = metrics_path.open("a" if resume_step is not None else "w", encoding="utf-8")
        self._trackers = _Trackers(report_to or [], run_dir, config or {})
        self._rows_printed = 0
        self._started = time.perf_counter()
        self._first_step: int | None = None
        self._bar = None
        if not (quiet or self.json_lines) and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, file=self.stream, dynamic_ncols=True, leave=False, unit="step")

    # -- console
    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """Free text (banner, notes). JSON mode sends it to stderr so stdout stays machine-readable."""
        if self.json_lines:
            print(text, file=sys.stderr, flush=True)
        elif not self.quiet:
            self._print(text)

    def alert(self, text: str) -> None:
        """A banner note that --quiet must not hide (steps were lost): on stderr when the banner is not shown."""
        if self.quiet:
            print(text, file=sys.stderr, flush=True)

    def progress(self, step: int) -> None:
        if self._first_step is None:
            self._first_step = step - 1
            self._started = time.perf_counter()
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def _eta(self, step: int) -> tuple[float, float | None]:
        elapsed = time.perf_counter() - self._started
        done = step - (self._first_step or 0)
        return elapsed, (elapsed / done * (self.total_steps - step)) if done > 0 else None

    # -- rows
    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        line = _jsonl([row])
        self._metrics.write(line)
        self._metrics.flush()
        self._packer.add(line)
        if self.json_lines and not self.quiet:
            print(json.dumps(row), file=self.stream, flush=True)

    def _write_training_metrics(self) -> None:
        started = time.perf_counter()
        write_json_atomic(self.run_dir / "training_metrics.json", training_metrics(self.history))
        finished = time.perf_counter()
        self._metrics_due = finished + max(METRICS_REWRITE_SECONDS,
                                           _METRICS_REWRITE_COST_RATIO * (finished - started))
        self._metrics_stale = False

    def flush(self) -> None:
        """Bring training_metrics.json up to date with every row logged (train rows rewrite it only every
        ``METRICS_REWRITE_SECONDS`` or more), e.g. when a checkpoint is saved."""
        if self._metrics_stale:
            self._write_training_metrics()

    def packed_rows(self) -> bytes:
        """Every row logged so far (the run's earlier ones too), gzipped, for a checkpoint to carry."""
        return self._packer.packed()

    def train_row(self, row: dict[str, Any]) -> None:
        row = {"type": "train", **row}
        self._record(row)
        self._metrics_stale = True
        if time.perf_counter() >= self._metrics_due:
            self._write_training_metrics()
        self._trackers.log("train", row)
        if self.quiet or self.json_lines:
            return
        if self._rows_printed % 20 == 0:
            self._print("  ".join(f"{title:>{width}}" for _, title, width, _ in COLUMNS))
        self._rows_printed += 1
        line = "  ".join(_format(row.get(key), width, spec) for key, _, width, spec in COLUMNS)
        if self._bar is None:  # no live bar (a log file, CI): put elapsed and ETA on the row instead
            elapsed, eta = self._eta(row["step"])
            line += f"  [{_clock(elapsed)} elapsed, eta {_clock(eta) if eta is not None else '-'}]"
        self._print(line)

    def eval_row(self, row: dict[str, Any]) -> None:
        row = {"type": "eval", **row}
        self._record(row)
        self._write_training_metrics()
        self._trackers.log("eval", row)
        self._write_plots()
        if not (self.quiet or self.json_lines):
            self._print(f"  eval @ step {row['step']}: val loss {row['val_loss']:.4f}  perplexity "
                        f"{row['val_perplexity']:.2f}  token accuracy {row['val_token_accuracy']:.3f}")

    def sample_rows(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Completions of validation prompts (train/samples.py); the first one printed, shortened."""
        for row in rows:
            self._record({"type": "sample", "step": step, **row})
        if rows and not (self.quiet or self.json_lines):
            first = rows[0]
            self._print(f"  sample @ step {step}: ...{first['prompt'][-60:]!r} -> {first['completion'][:100]!r}")

    def warning(self, step: int, check: str, message: str) -> None:
        self._record({"type": "warning", "step": step, "check": check, "message": message})
        if not self.json_lines:
            self._print(f"  warning (step {step}): {message}")

    def _write_plots(self) -> None:
        from lamelm_fast.metrics.plots import write_plots

        write_plots(self.run_dir, [r for r in self.history if r["type"] == "train"],
                    [r for r in self.history if r["type"] == "eval"])

    def summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.flush()
        self._write_plots()
        if self.json_lines:
            print(json.dumps({"type": "summary", **summary}), file=self.stream, flush=True)
            return
        lines = [f"  {key.replace('_', ' ')}: {value:.4g}" if isinstance(value, float) else
                 f"  {key.replace('_', ' ')}: {value}" for key, value in summary.items()]
        self._print("\n".join(["Run summary", *lines, *_segments_line(summary)]))

    def close(self) -> None:
        try:
            self.flush()  # a run that stops on an error, too, leaves the arrays of every row it logged
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._trackers.close()
            self._metrics.close()
