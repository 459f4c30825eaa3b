"""Console table and run files. Rows arrive as plain floats: reading the device happens at logging steps only."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

# (metrics key, column title, width, format spec)
COLUMNS = (("step", "Step", 7, "d"), ("loss", "Loss", 9, ".4f"), ("grad_norm", "Grad Norm", 10, ".4f"),
           ("learning_rate", "Learning Rate", 14, ".3e"), ("epoch", "Epoch", 7, ".3f"),
           ("tokens_per_second", "Tok/s", 9, ".0f"), ("memory_gb", "Mem(GB)", 8, ".2f"))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary file and rename, so a crash leaves the previous version intact."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _format(value: Any, width: int, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-' if value is None else str(value):>{width}}"
    return f"{value:>{width}{spec}}"


class RunLogger:
    def __init__(self, run_dir: Path, quiet: bool = False, resume: bool = False, stream: TextIO | None = None) -> None:
        self.run_dir = run_dir
        self.quiet = quiet
        self.stream = stream or sys.stdout
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run continues its metrics file; a new run in the same directory starts it afresh.
        self._metrics = (run_dir / "metrics.jsonl").open("a" if resume else "w", encoding="utf-8")
        self._rows_printed = 0

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def _record(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def train_row(self, row: dict[str, Any]) -> None:
        self._record({"type": "train", **row})
        if self._rows_printed % 20 == 0:
            self.say("  ".join(f"{title:>{width}}" for _, title, width, _ in COLUMNS))
        self._rows_printed += 1
        self.say("  ".join(_format(row.get(key), width, spec) for key, _, width, spec in COLUMNS))

    def eval_row(self, row: dict[str, Any]) -> None:
        self._record({"type": "eval", **row})
        self.say(f"  eval @ step {row['step']}: val loss {row['val_loss']:.4f}  perplexity "
                 f"{row['val_perplexity']:.2f}  token accuracy {row['val_token_accuracy']:.3f}")

    def summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", summary)
        lines = [f"  {key.replace('_', ' ')}: {value:.4g}" if isinstance(value, float) else
                 f"  {key.replace('_', ' ')}: {value}" for key, value in summary.items()]
        print("\n".join(["Run summary", *lines]), file=self.stream, flush=True)

    def close(self) -> None:
        self._metrics.close()
