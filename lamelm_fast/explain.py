"""``python -m lamelm_fast.explain RUN_DIR``: what a training run did, read from its logs.

RUN_DIR is a lamelm-fast run directory (``metrics.jsonl``), a Hugging Face ``trainer_state.json``, an HF
checkpoint directory holding one, or an HF output directory (its ``trainer_state.json``, else the newest
``checkpoint-*/trainer_state.json``). Both are normalised into :class:`RunData`; every analysis below is a pure
function of that data, and every number in the report is computed from it.
"""

from __future__ import annotations

import json
import math
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lamelm_fast.cli_parser import OneLineParser
from lamelm_fast.metrics.health import HealthThresholds
from lamelm_fast.metrics.logger import CHECKPOINT_ROWS_FILE, unpacked_text
from lamelm_fast.metrics.plots import epoch_number

EXPECTED = ("expected a lamelm-fast run directory (with metrics.jsonl), an HF trainer_state.json, or a directory "
            "holding trainer_state.json or checkpoint-*/trainer_state.json")
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# (our summary key, key in HF's end-of-training log entry)
HF_SUMMARY_KEYS = (("runtime_seconds", "train_runtime"), ("samples_per_second", "train_samples_per_second"),
                   ("steps_per_second", "train_steps_per_second"), ("mean_train_loss", "train_loss"),
                   ("tokens_per_second", "train_tokens_per_second"))

MIN_PHASE_POINTS = 6
RAPID_FRACTION = 0.25  # rapid decline: the per-step decline is at least this fraction of the steepest one
PLATEAU_FRACTION = 0.02  # plateau: the rest of the smoothed curve stays within this fraction of the total drop
NOISE_BAND = 3.0  # ... or within this many standard deviations of the smoothed curve's noise, if that is wider
NOISE_ERRORS = 2.0  # the end of a run is a trend when its net change exceeds this many standard errors
OVERFIT_RISE = 0.01  # val loss must rise by more than this fraction of its best value to count as rising


class RunReadError(Exception):
    """The input is absent or not a run this tool understands; the message names the path and what was expected."""


@dataclass(frozen=True)
class TrainPoint:
    step: int
    loss: float
    learning_rate: float | None = None
    epoch: float | None = None
    grad_norm: float | None = None
    token_accuracy: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    gpu_util: float | None = None  # % over the window
    input_share: float | None = None  # of the window's time spent making batches (our trainer)


@dataclass(frozen=True)
class EvalPoint:
    step: int
    val_loss: float


@dataclass
class RunData:
    """One run in a form shared by both sources. ``checkpoints`` maps step -> directory of the saved checkpoint."""

    source: str
    kind: str  # "lamelm-fast" or "hf-trainer"
    train: list[TrainPoint]
    evals: list[EvalPoint]
    checkpoints: dict[int, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # --eval-samples rows (lamelm-fast runs)
    finished: bool = True  # False: a lamelm-fast run without its summary (stopped by a signal, an error, a crash)


# ---------------------------------------------------------------------------------------------- reading runs


def _number(value: Any) -> float | None:
    """A finite float, or None: older files miss keys, and NaN grad norms are logged on skipped steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fail(path: Path, problem: str) -> NoReturn:
    raise RunReadError(f"{path}: {problem}; {EXPECTED}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        _fail(path, f"cannot read ({error.strerror or error})")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        _fail(path, f"not valid JSON ({error})")


def _checkpoints_in(directory: Path, up_to_step: float = math.inf) -> dict[int, str]:
    found = {}
    if directory.is_dir():
        for child in directory.iterdir():
            match = CHECKPOINT_DIR.match(child.name)
            if match and child.is_dir() and int(match.group(1)) <= up_to_step:
                found[int(match.group(1))] = str(child)
    return dict(sorted(found.items()))


def _train_point(row: dict[str, Any], loss: float, accuracy_key: str) -> TrainPoint:
    return TrainPoint(step=int(row["step"]), loss=loss, learning_rate=_number(row.get("learning_rate")),
                      epoch=_number(row.get("epoch")), grad_norm=_number(row.get("grad_norm")),
                      token_accuracy=_number(row.get(accuracy_key)),
                      tokens_per_second=_number(row.get("tokens_per_second")), mfu=_number(row.get("mfu")),
                      gpu_util=_number(row.get("gpu_util")), input_share=_number(row.get("input_share")))


def _split_losses(rows: list[tuple[dict[str, Any], str]], accuracy_key: str, val_key: str,
                  notes: list[str]) -> tuple[list[TrainPoint], list[EvalPoint]]:
    """Rows tagged "train"/"eval" -> points sorted by step; a step logged twice (a resumed run) keeps the last."""
    train: dict[int, TrainPoint] = {}
    evals: dict[int, EvalPoint] = {}
    for row, kind in rows:
        if _number(row.get("step")) is None:
            continue
        step = int(row["step"])
        if kind == "train":
            loss = _number(row.get("loss"))
            if loss is None:
                notes.append(f"non-finite or missing train loss at step {step} ({row.get('loss')!r}): left out")
                continue
            train[step] = _train_point(row, loss, accuracy_key)
        elif (val_loss := _number(row.get(val_key))) is not None:
            evals[step] = EvalPoint(step, val_loss)
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def load_lamelm_run(run_dir: Path) -> RunData:
    """A run directory's metrics.jsonl, or a checkpoint's copy of the rows logged up to its step."""
    metrics = run_dir / "metrics.jsonl"
    in_checkpoint = not metrics.is_file() and (run_dir / CHECKPOINT_ROWS_FILE).is_file()
    if in_checkpoint:
        metrics = run_dir / CHECKPOINT_ROWS_FILE
    try:
        lines = (unpacked_text(metrics.read_bytes()) if in_checkpoint else metrics.read_text(encoding="utf-8")
                 ).splitlines()
    except (OSError, UnicodeDecodeError, zlib.error) as error:
        _fail(metrics, f"cannot read ({error})")
    rows: list[tuple[dict[str, Any], str]] = []
    warnings: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    notes: list[str] = []
    bad_lines = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad_lines.append(number)  # e.g. a line cut short by a crash mid-write
            continue
        if not isinstance(row, dict):
            bad_lines.append(number)
            continue
        # Rows of older files may lack "type": infer it from the keys.
        kind = row.get("type") or ("eval" if "val_loss" in row else "train" if "loss" in row else "")
        if kind == "warning":
            step = _number(row.get("step"))
            warnings.append({"step": None if step is None else int(step), "check": row.get("check"),
                             "message": row.get("message")})
        elif kind in ("train", "eval"):
            rows.append((row, kind))
        elif kind == "sample" and isinstance(row.get("completion"), str):
            samples.append(row)
    if bad_lines:
        notes.append(f"{len(bad_lines)} unreadable line(s) in {metrics} skipped (line {bad_lines[0]} first)")
    train, evals = _split_losses(rows, "token_accuracy", "val_loss", notes)
    if not train and not evals:
        _fail(metrics, "holds no train or eval rows")
    summary: dict[str, Any] = {}
    last = max(p.step for p in [*train, *evals])
    if in_checkpoint:  # the run up to this checkpoint: as an HF checkpoint's trainer_state.json describes it
        notes.append(f"a checkpoint: the rows logged up to its step {last}, and the checkpoints beside it up to it")
        return RunData(str(run_dir), "lamelm-fast", train, evals, _checkpoints_in(run_dir.parent, last), summary,
                       warnings, notes, samples)
    finished = (run_dir / "summary.json").is_file()
    if finished:
        loaded = _read_json(run_dir / "summary.json")
        if isinstance(loaded, dict):
            summary = {k: v for k, v in loaded.items() if isinstance(v, (int, float, str))}
    checkpoints = _checkpoints_in(run_dir)
    if not finished:
        notes.append(f"no summary.json: the run did not finish (a signal, an error or a crash stopped it after step "
                     f"{last}); this covers its logged steps"
                     + (f". Its last checkpoint is {checkpoints[max(checkpoints)]}: the same command plus "
                        "--resume-from-checkpoint latest continues it" if checkpoints else ""))
    return RunData(str(run_dir), "lamelm-fast", train, evals, checkpoints, summary, warnings, notes, samples,
                   finished)


def load_hf_state(state_file: Path) -> RunData:
    state = _read_json(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        _fail(state_file, "not an HF trainer_state.json (no log_history list)")
    rows: list[tuple[dict[str, Any], str]] = []
    summary: dict[str, Any] = {}
    warnings: list[dict[str, Any]] = []
    for entry in state["log_history"]:
        if not isinstance(entry, dict):
            continue
        step = _number(entry.get("step"))
        for warning in entry.get("health_warnings") or []:  # LamelmCallback's ({check, message}; older: the text)
            if isinstance(warning, dict):
                warnings.append({"step": None if step is None else int(step), "check": warning.get("check"),
                                 "message": warning.get("message")})
            elif isinstance(warning, str):
                warnings.append({"step": None if step is None else int(step), "check": "health", "message": warning})
        if "eval_loss" in entry:
            rows.append((entry, "eval"))
        elif "loss" in entry:
            rows.append((entry, "train"))
        elif "train_runtime" in entry:  # the end-of-training entry
            for ours, theirs in HF_SUMMARY_KEYS:
                if _number(entry.get(theirs)) is not None:
                    summary[ours] = float(entry[theirs])
    notes: list[str] = []
    train, evals = _split_losses(rows, "mean_token_accuracy", "eval_loss", notes)
    if not train and not evals:
        _fail(state_file, "log_history holds no train or eval entries")
    # A checkpoint's state covers the run up to that checkpoint: later checkpoints are outside what it describes.
    in_checkpoint = CHECKPOINT_DIR.match(state_file.parent.name) is not None
    folder = state_file.parent.parent if in_checkpoint else state_file.parent
    last_step = _number(state.get("global_step")) or max(p.step for p in [*train, *evals])
    return RunData(str(state_file), "hf-trainer", train, evals, _checkpoints_in(folder, last_step), summary, warnings,
                   notes)


def load_run(path: str | Path) -> RunData:
    """Read any of the accepted inputs; raises :class:`RunReadError` with one line naming the path."""
    path = Path(path)
    if path.is_file():
        return load_lamelm_run(path.parent) if path.name == "metrics.jsonl" else load_hf_state(path)
    if not path.is_dir():
        _fail(path, "no such file or directory")
    if (path / "metrics.jsonl").is_file() or (path / CHECKPOINT_ROWS_FILE).is_file():
        return load_lamelm_run(path)
    if (path / "trainer_state.json").is_file():
        return load_hf_state(path / "trainer_state.json")
    states = [(int(m.group(1)), child / "trainer_state.json") for child in path.iterdir()
              if (m := CHECKPOINT_DIR.match(child.name)) and (child / "trainer_state.json").is_file()]
    if not states:
        _fail(path, f"found no metrics.jsonl, {CHECKPOINT_ROWS_FILE} (a checkpoint's), trainer_state.json or "
                    "checkpoint-*/trainer_state.json")
    return load_hf_state(max(states)[1])


# ---------------------------------------------------------------------------------------------- analysis


def milestones(train: list[TrainPoint]) -> list[dict[str, Any]]:
    """The first logged step, the last logged step of each epoch and the last step (labels merged when equal)."""
    if not train:
        return []
    labels: dict[int, list[str]] = {0: ["first logged step"]}
    epoch_ends: dict[int, int] = {}
    for index, point in enumerate(train):
        if point.epoch is not None:
            epoch_ends[epoch_number(point.epoch)] = index
    final_epoch = train[-1].epoch
    for number, index in sorted(epoch_ends.items()):
        partial = index == len(train) - 1 and final_epoch is not None and final_epoch < number - 1e-6
        labels.setdefault(index, []).append(f"epoch {number} so far (partial)" if partial else f"end of epoch {number}")
    labels.setdefault(len(train) - 1, []).append("last step")
    return [{"label": ", ".join(labels[i]), "step": train[i].step, "epoch": train[i].epoch, "loss": train[i].loss,
             "token_accuracy": train[i].token_accuracy, "learning_rate": train[i].learning_rate}
            for i in sorted(labels)]


def end_window(points: int) -> int:
    """How many of the last logged points stand for the end of the run: about 10%, from 6 to 20."""
    return min(points, max(6, min(20, points // 10)))


def smoothing_window(points: int) -> int:
    """An odd window about 4% of the points (at least 3): wide enough to calm noise, narrow enough for the knee."""
    return max(3, (points // 25) | 1)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average whose window shrinks symmetrically at the ends.

    Symmetric so the steep start is not pulled down by later points: the first point keeps its own value.
    """
    index = np.arange(len(values))
    half = np.minimum(window // 2, np.minimum(index, len(values) - 1 - index))
    sums = np.concatenate([[0.0], np.cumsum(values)])
    return (sums[index + half + 1] - sums[index - half]) / (2 * half + 1)


def suffix_lines(steps: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each start index i, the least-squares line through points i..end: its net change from step i to the last
    step, the standard error of that change (inf under 3 points) and its value at the last step.

    Suffix sums make it O(n), so runs logged at every one of many thousand steps stay fast.
    """
    x, y = steps - steps.mean(), losses - losses.mean()  # centred, so the sums do not cancel catastrophically

    def suffix(values: np.ndarray) -> np.ndarray:
        return np.cumsum(values[::-1])[::-1]

    count, sum_x, sum_y = suffix(np.ones_like(x)), suffix(x), suffix(y)
    sxx = suffix(x * x) - sum_x ** 2 / count
    sxy = suffix(x * y) - sum_x * sum_y / count
    syy = suffix(y * y) - sum_y ** 2 / count
    spread = sxx > 1e-12 * max(float(sxx[0]), 1.0)  # the last point alone has no slope
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxx), where=spread)
    span = x[-1] - x
    residual = np.maximum(syy - slope * sxy, 0.0)
    variance = np.divide(residual, (count - 2) * sxx, out=np.full_like(sxx, np.inf), where=spread & (count > 2))
    error = np.multiply(np.sqrt(variance), span, out=np.full_like(sxx, np.inf), where=np.isfinite(variance))
    end_level = sum_y / count + slope * (x[-1] - sum_x / count) + losses.mean()
    return slope * span, error, end_level


def find_phases(steps: np.ndarray, losses: np.ndarray) -> dict[str, Any]:
    """Split the loss curve into rapid decline, slowing and plateau; the returned ``rule`` says how."""
    n = len(losses)
    if n < MIN_PHASE_POINTS:
        return {"found": False, "phases": [], "rule": None,
                "text": f"Too little data to find phases: {n} logged point(s), at least {MIN_PHASE_POINTS} needed."}
    window = smoothing_window(n)
    smoothed = smooth(losses, window)
    scatter = float(np.std(losses - smoothed))  # point-to-point noise of the raw losses
    noise = scatter / math.sqrt(window)  # noise left in the smoothed curve
    drop = float(smoothed[0] - smoothed.min())
    # Judge whether it fell from the mean of the first window, not the first point alone, which is as noisy as any.
    fall = float(np.mean(losses[:window]) - smoothed.min())
    if fall <= NOISE_BAND * scatter:
        return {"found": False, "phases": [], "rule": None, "total_drop": drop,
                "text": f"The loss did not fall clearly (from {np.mean(losses[:window]):.4f}, the mean of the first "
                        f"{window} points, to a smoothed low of {smoothed.min():.4f}, against a noise std of "
                        f"{scatter:.2g}); no decline phases."}
    decline = -np.gradient(smoothed, steps)  # per-step rate of decline
    steepest = int(np.argmax(decline))
    below = np.nonzero(decline[steepest:] < RAPID_FRACTION * decline[steepest])[0]
    rapid_end = steepest + int(below[0]) if below.size else n - 1

    # Plateau: the first point from which the rest of the run is flat. Judged by a line fitted to the remaining
    # points, not by the extremes of the smoothed curve, whose spread grows with the length of a noisy tail.
    band = max(PLATEAU_FRACTION * drop, NOISE_BAND * noise)
    change, change_error, end_level = suffix_lines(steps, losses)
    shortest = max(4, n // 20)  # a few flat points at the very end are the end of the data, not a plateau
    flat = (np.abs(smoothed - end_level) < band) & (np.abs(change) < band)
    flat[n - shortest + 1:] = False
    # No plateau while the last points still trend beyond the band (the test "End of the run" reports).
    tail = end_window(n)
    tail_change, tail_error, _ = suffix_lines(steps[-tail:], losses[-tail:])
    moving_at_end = abs(tail_change[0]) > max(band, NOISE_ERRORS * tail_error[0])
    plateau_start = int(np.argmax(flat)) if flat.any() and not moving_at_end else None
    # A rise after the lowest point (divergence, a too-high LR) ends the decline there instead of a plateau.
    lowest = int(np.argmin(smoothed))
    rising = (n - lowest >= max(6, shortest)
              and change[lowest] > max(band, NOISE_ERRORS * change_error[lowest]))
    decline_end = lowest if rising else plateau_start if plateau_start is not None else n - 1
    rapid_end = min(rapid_end, decline_end)  # a sharp knee goes straight from rapid decline to the next phase

    def phase(name: str, first: int, last: int) -> dict[str, Any]:
        span = float(steps[last] - steps[first])
        return {"name": name, "start_step": int(steps[first]), "end_step": int(steps[last]),
                "start_loss": float(smoothed[first]), "end_loss": float(smoothed[last]),
                "decline_per_step": float(smoothed[first] - smoothed[last]) / span if span else 0.0}

    phases = [phase("rapid decline", 0, rapid_end)]
    if decline_end > rapid_end:
        phases.append(phase("slowing", rapid_end, decline_end))
    if rising:
        phases.append(phase("rising", lowest, n - 1))
    elif plateau_start is not None:
        phases.append(phase("plateau", plateau_start, n - 1))
    rule = (f"Loss smoothed by a centred moving average over {window} points. Rapid decline lasts while the "
            f"per-step decline is at least {RAPID_FRACTION:.0%} of the steepest ({decline[steepest]:.4g} per step "
            f"at step {int(steps[steepest])}). The plateau starts at the first step from which the smoothed loss is "
            f"within {band:.4g} (the wider of {PLATEAU_FRACTION:.0%} of the total drop {drop:.4g} and "
            f"{NOISE_BAND:g}x the smoothed noise) of where the run ends and a line fitted to the remaining points "
            f"changes by less than that, unless a line through the last {tail} points changes by more than that and "
            f"by more than {NOISE_ERRORS:g} standard errors. Slowing lies in between. If a line fitted from the "
            "smoothed minimum rises by more than both, the rest is a rising phase.")
    parts = [f"{p['name']} over steps {p['start_step']}-{p['end_step']} (smoothed loss {p['start_loss']:.4f} -> "
             f"{p['end_loss']:.4f})" for p in phases]
    text = "; ".join(parts) + "."
    if rising:
        text += (f" The loss rose again after its smoothed minimum at step {int(steps[lowest])}: a line fitted from "
                 f"there rises by {change[lowest]:.4g}.")
    elif plateau_start is None:
        text += " No plateau: the loss was still moving at the end of the run."
    return {"found": True, "phases": phases, "rule": rule, "smoothing_window": window, "total_drop": drop,
            "plateau_band": band, "text": text}


def mean_vs_final(train: list[TrainPoint], summary: dict[str, Any]) -> dict[str, Any]:
    if not train:
        return {"text": "No train losses were logged."}
    losses = [p.loss for p in train]
    # Prefer the run's own mean: HF's train_loss averages every step, not only the logged ones; and ours covers the
    # whole of a resumed run, whose earlier segments' rows may be in another directory (so does its first loss).
    mean = _number(summary.get("mean_train_loss"))
    mean = mean if mean is not None else float(np.mean(losses))
    first = _number(summary.get("first_loss"))
    first, final = first if first is not None else losses[0], losses[-1]
    result = {"first_loss": first, "final_loss": final, "mean_train_loss": mean, "difference": mean - final}
    if final < mean:
        result["text"] = (f"The mean train loss ({mean:.4f}) is {mean - final:.4f} above the final loss ({final:.4f}) "
                          f"because it averages in the early high-loss steps (first loss {first:.4f}). For a "
                          "falling curve the final loss is the better measure of where the model ended.")
    else:
        result["text"] = (f"The final loss ({final:.4f}) is not below the mean ({mean:.4f}): the loss did not fall "
                          f"over the run overall (first loss {first:.4f}), so neither number shows learning.")
    return result


def end_fluctuation(train: list[TrainPoint]) -> dict[str, Any]:
    """Is the wiggle at the end noise or a trend? Tests the net change of a fitted line against the scatter."""
    count = end_window(len(train))
    if count < 4:
        return {"points": count, "text": "Too few logged points to judge the end of the run."}
    steps = np.array([p.step for p in train[-count:]], dtype=float)
    losses = np.array([p.loss for p in train[-count:]])
    scatter = float(np.std(losses))
    changes, errors, _ = suffix_lines(steps, losses)
    # With few points a line through pure noise still tilts: the change must stand out from its standard error.
    change, change_error = float(changes[0]), float(errors[0])
    noise = abs(change) <= NOISE_ERRORS * change_error
    result = {"points": count, "first_step": int(steps[0]), "last_step": int(steps[-1]), "std": scatter,
              "net_change": change, "net_change_error": change_error, "is_noise": noise}
    where = f"Over the last {count} logged points (steps {int(steps[0])}-{int(steps[-1])})"
    rule = (f"(rule: a trend when the fitted line's net change exceeds {NOISE_ERRORS:g} standard errors "
            "estimated from the scatter)")
    if noise:
        result["text"] = (f"{where} the loss has a standard deviation of {scatter:.4f} while its fitted net change "
                          f"is {change:+.4f} (standard error {change_error:.4f}): the final wiggle is noise {rule}.")
    else:
        direction = "falling" if change < 0 else "rising"
        result["text"] = (f"{where} the loss is still {direction}: net change {change:+.4f} (standard error "
                          f"{change_error:.4f}) against a standard deviation of {scatter:.4f}; the change at the end "
                          f"is a trend, not noise {rule}.")
    return result


def overfitting(train: list[TrainPoint], evals: list[EvalPoint], finished: bool = True) -> dict[str, Any]:
    if not evals and not finished:
        return {"verdict": "unknown", "from_step": None,
                "text": "Overfitting cannot be judged: the run stopped before any evaluation (lamelm-fast evaluates "
                        "every --eval-steps and at the end of the run)."}
    if not evals:
        return {"verdict": "unknown", "from_step": None,
                "text": "Overfitting cannot be judged: the run recorded no validation loss. Hold out data with "
                        "--eval-split-ratio (e.g. 0.05) and evaluate during training with --eval-steps (HF Trainer: "
                        "an eval_dataset with eval_strategy='steps')."}
    if len(evals) == 1:
        return {"verdict": "unknown", "from_step": None,
                "text": f"Overfitting cannot be judged from one evaluation (val loss {evals[0].val_loss:.4f} at step "
                        f"{evals[0].step}): set --eval-steps to evaluate during training and see the trend."}
    best = min(evals, key=lambda e: e.val_loss)
    last = evals[-1]
    rise = last.val_loss - best.val_loss
    result: dict[str, Any] = {"best_step": best.step, "best_val_loss": best.val_loss, "last_step": last.step,
                              "last_val_loss": last.val_loss, "from_step": None}
    if best is last:
        result.update(verdict="not overfitting",
                      text=f"Not overfitting: the val loss fell to its lowest at the last evaluation "
                           f"({evals[0].val_loss:.4f} at step {evals[0].step} -> {last.val_loss:.4f} at step "
                           f"{last.step}).")
        return result
    if rise <= OVERFIT_RISE * abs(best.val_loss):
        result.update(verdict="not overfitting",
                      text=f"Not overfitting (yet): the val loss has stayed within {OVERFIT_RISE:.0%} of its best "
                           f"({best.val_loss:.4f} at step {best.step}) since then: it has stopped improving.")
        return result
    # Compare the train loss over the same span, smoothed so one noisy logging step cannot flip the verdict.
    train_then = train_now = None
    if train:
        steps = np.array([p.step for p in train], dtype=float)
        smoothed = smooth(np.array([p.loss for p in train]), smoothing_window(len(train)))
        train_then = float(np.interp(best.step, steps, smoothed))
        train_now = float(np.interp(last.step, steps, smoothed))
    result.update(train_loss_at_best=train_then, train_loss_at_last=train_now)
    train_rise = train_now - train_then if train_then is not None and train_now is not None else None
    # Overfitting widens the gap: val rises while train falls or holds. If train rose as much, training got worse.
    if train_rise is not None and train_rise < rise / 2:
        moved = "fell" if train_rise < 0 else "stayed about flat"
        result.update(verdict="overfitting", from_step=best.step,
                      text=f"Overfitting from step {best.step}: the val loss rose from {best.val_loss:.4f} to "
                           f"{last.val_loss:.4f} (step {last.step}) while the train loss {moved} ({train_then:.4f} -> "
                           f"{train_now:.4f}, smoothed) (rule: val rises by more than {OVERFIT_RISE:.0%} of its best "
                           "and by more than twice the train loss's change).")
    else:
        result.update(verdict="val and train rising", from_step=best.step,
                      text=f"The val loss rose after step {best.step} ({best.val_loss:.4f} -> {last.val_loss:.4f}) "
                           "and the train loss rose with it: training itself got worse (check the learning rate and "
                           "the warnings), which is not classic overfitting.")
    return result


def pick_checkpoint(evals: list[EvalPoint], checkpoints: dict[int, str]) -> dict[str, Any]:
    """The newest checkpoint at or before the best val loss; without evaluations, the last checkpoint."""
    if not checkpoints:
        return {"step": None, "path": None, "text": "No checkpoint-N directories were found next to the logs."}
    steps = sorted(checkpoints)
    if not evals:
        chosen = steps[-1]
        reason = ("there is no validation loss to choose by, so take the last checkpoint: it has seen the most "
                  "training")
    else:
        best = min(evals, key=lambda e: e.val_loss)
        before = [s for s in steps if s <= best.step]
        if before:
            chosen = before[-1]
            gap = "" if chosen == best.step else f", {best.step - chosen} steps before it"
            reason = (f"the best val loss ({best.val_loss:.4f}) was at step {best.step}, and this is the newest "
                      f"checkpoint saved at or before it{gap}")
            if chosen != steps[-1]:
                reason += "; every evaluation after that step was worse, so later checkpoints are not better"
            if chosen != best.step:
                reason += " (save at the eval steps to keep the best one exactly)"
        else:
            chosen = steps[0]
            reason = (f"the best val loss ({best.val_loss:.4f}) was at step {best.step}, before any checkpoint was "
                      "saved, so take the earliest checkpoint, the nearest after it")
    return {"step": chosen, "path": checkpoints[chosen], "text": f"Use {checkpoints[chosen]}: {reason}."}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _duration(seconds: float) -> str:
    if seconds < 9.5:  # a short test run: whole seconds would say 0
        return f"{seconds:.2g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _first_logging_step(train: list[TrainPoint], segment_first_step: int) -> int:
    """The run's first logging step, however many segments before the logs start: a run logs every L steps from step
    L (and at its last step), so it is the gap between the first two logged steps. Without a second row before the
    last, the last segment's resumed step stands in (logs that start after it lack the earlier segments' rows)."""
    if len(train) >= 3:
        return train[1].step - train[0].step
    return segment_first_step - 1


def segments(train: list[TrainPoint], summary: dict[str, Any]) -> dict[str, Any]:
    """A resumed run (trained in segments, one per process): what its summary and this directory's logs cover."""
    count, first = _number(summary.get("segments")), _number(summary.get("segment_first_step"))
    if count is None or count <= 1 or first is None:
        return {"segments": None if count is None else int(count), "logs_from_step": None, "text": ""}
    steps = int(summary.get("steps") or (train[-1].step if train else 0))
    counted = _number(summary.get("tokens")) is not None
    text = f"The run was trained in {int(count)} segments (resumed last at step {int(first) - 1}); " + (
        f"its summary covers steps 1-{steps}, the runtime adding up each segment's own time." if counted else
        "the checkpoint it resumed from predates run totals, so its summary counts tokens, samples and time from "
        f"step {int(first)} on and takes earlier losses, evaluations and warnings from the logs kept here.")
    logs_from = train[0].step if train else None
    if logs_from is not None and logs_from > _first_logging_step(train, int(first)):  # earlier rows are elsewhere
        text += (f" This directory's logs start at step {logs_from}: the steps before it were logged in the run "
                 "directory of a checkpoint saved by an older version (which carries no logged rows), so the "
                 "sections below that read the logs (milestones, phases, end of the run, overfitting, checkpoint, "
                 f"warnings) cover steps {logs_from}-{steps} only.")
        if counted:
            whole = [f"{name} {summary[key]:.4f}" for name, key in (("first loss", "first_loss"),
                                                                    ("mean train loss", "mean_train_loss"),
                                                                    ("best val loss", "best_val_loss"))
                     if _number(summary.get(key)) is not None]
            if _number(summary.get("best_val_loss")) is not None:
                whole[-1] += f" at step {summary.get('best_val_step')}"
            whole.append(f"{summary.get('warnings')} warning(s)")
            text += f" The whole run, from its summary: {', '.join(whole)}."
    return {"segments": int(count), "logs_from_step": logs_from, "text": text}


def throughput(train: list[TrainPoint], summary: dict[str, Any]) -> dict[str, Any]:
    def mean_of(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(np.mean(present)) if present else None

    mfu = _number(summary.get("mfu"))
    result = {"tokens_per_second": _number(summary.get("tokens_per_second")),
              "logged_tokens_per_second": mean_of([p.tokens_per_second for p in train]),
              "runtime_seconds": _number(summary.get("runtime_seconds")),
              "samples_per_second": _number(summary.get("samples_per_second")),
              "mfu": mfu if mfu is not None else mean_of([p.mfu for p in train]),
              "peak_memory_gb": _number(summary.get("peak_memory_gb")),
              "gpu_util": mean_of([p.gpu_util for p in train]),
              "input_share": mean_of([p.input_share for p in train])}
    resumed = (_number(summary.get("segments")) or 1) > 1
    lines = []
    if result["tokens_per_second"] is not None:
        lines.append(f"{result['tokens_per_second']:,.0f} tokens/s over the whole run (evaluation included"
                     + ("; the segments' own time summed, not the time between them)" if resumed else ")"))
    if result["logged_tokens_per_second"] is not None:
        lines.append(f"{result['logged_tokens_per_second']:,.0f} tokens/s on average over the logged training "
                     "windows")
    if result["samples_per_second"] is not None:
        lines.append(f"{result['samples_per_second']:,.2f} samples/s")
    if result["runtime_seconds"] is not None:
        lines.append(f"runtime {_duration(result['runtime_seconds'])}")
    if result["mfu"] is not None:
        lines.append(f"MFU {result['mfu']:.1%}")
    if result["peak_memory_gb"] is not None:
        lines.append(f"peak memory {result['peak_memory_gb']:.2f} GB")
    if result["gpu_util"] is not None:
        lines.append(f"GPU utilisation {result['gpu_util']:.0f}% on average over the windows")
    if result["input_share"] is not None:
        lines.append(f"{result['input_share']:.1%} of the training time spent making batches"
                     + (" (the input pipeline held the GPU back)"
                        if result["input_share"] > HealthThresholds().input_share_max else ""))
    segment_rate = _number(summary.get("segment_tokens_per_second"))
    if resumed and segment_rate is not None:
        # MFU, peak memory and the segment's own rate were measured by the last process, maybe on another device.
        lines.append(f"the last segment alone (steps {summary['segment_first_step']}-{summary.get('steps')}, whose "
                     f"device the MFU and peak memory describe): {segment_rate:,.0f} tokens/s")
    result["text"] = ("; ".join(lines) + ".") if lines else "No throughput or runtime numbers were recorded."
    return result


def _clip(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def samples_over_time(samples: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Per sampled prompt, the model's completion at the first and the last evaluation, and the reference."""
    by_prompt: dict[Any, list[dict[str, Any]]] = {}
    for row in samples:
        by_prompt.setdefault(row.get("index"), []).append(row)
    if not by_prompt:
        return {"prompts": [], "text": "The HF Trainer logs no completions." if kind != "lamelm-fast" else
                "No samples were logged: --eval-samples N shows what the model generates for N validation prompts "
                "at each evaluation."}
    prompts, lines = [], []
    for rows in by_prompt.values():
        first, last = rows[0], rows[-1]
        prompts.append({"prompt": first.get("prompt"), "reference": first.get("reference"),
                        "first_step": first.get("step"), "first": first["completion"],
                        "last_step": last.get("step"), "last": last["completion"]})
        lines += [f"- prompt {_clip(str(first.get('prompt', '')), 120)}",
                  f"  - step {first.get('step')}: {_clip(first['completion'])}",
                  *([f"  - step {last.get('step')}: {_clip(last['completion'])}"] if last is not first else []),
                  f"  - reference: {_clip(str(first.get('reference', '')))}"]
    return {"prompts": prompts, "text": "\n".join(lines)}


def _with_export_hint(choice: dict[str, Any], kind: str) -> dict[str, Any]:
    """A lamelm-fast checkpoint also gets the command that makes it a standalone model (adapters merged)."""
    if kind == "lamelm-fast" and choice["path"] is not None:
        merged = Path(choice["path"]).parent / f"merged-{choice['step']}"
        choice["export_command"] = f"python -m lamelm_fast.export {choice['path']} {merged}"
        choice["text"] += (f" To serve it as one standalone model directory (an adapter merged into its base, a "
                           f"full fine-tune in the dtype you choose): `{choice['export_command']}`.")
    return choice


def analyse(run: RunData) -> dict[str, Any]:
    """The whole report as one JSON-ready dict; the Markdown output renders exactly this."""
    steps = np.array([p.step for p in run.train], dtype=float)
    losses = np.array([p.loss for p in run.train])
    return {
        "source": run.source,
        "kind": run.kind,
        "train_points": len(run.train),
        "eval_points": len(run.evals),
        "first_step": run.train[0].step if run.train else None,
        "last_step": run.train[-1].step if run.train else None,
        "segments": segments(run.train, run.summary),
        "checkpoints": sorted(run.checkpoints),
        "milestones": milestones(run.train),
        "phases": find_phases(steps, losses),
        "mean_vs_final": mean_vs_final(run.train, run.summary),
        "end_fluctuation": end_fluctuation(run.train),
        "overfitting": overfitting(run.train, run.evals, run.finished),
        "checkpoint": _with_export_hint(pick_checkpoint(run.evals, run.checkpoints), run.kind),
        "throughput": throughput(run.train, run.summary),
        "samples": samples_over_time(run.samples, run.kind),
        "warnings": run.warnings,
        "notes": run.notes,
    }


# ---------------------------------------------------------------------------------------------- output


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(analysis: dict[str, Any]) -> str:
    checkpoints = ", ".join(str(s) for s in analysis["checkpoints"]) or "none"
    lines = [f"# Run explained: {analysis['source']}", "",
             f"{analysis['kind']} run: {analysis['train_points']} logged train points"
             + (f" (steps {analysis['first_step']}-{analysis['last_step']})" if analysis["train_points"] else "")
             + f", {_count(analysis['eval_points'], 'evaluation')}, checkpoints at steps: {checkpoints}.", "",
             *([analysis["segments"]["text"], ""] if analysis["segments"]["text"] else []),
             "## Milestones", ""]
    if analysis["milestones"]:
        lines += ["| point | step | epoch | loss | token accuracy | learning rate |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {m['label']} | {m['step']} | {_cell(m['epoch'], '.2f')} | {m['loss']:.4f} | "
                  f"{_cell(m['token_accuracy'], '.3f')} | {_cell(m['learning_rate'], '.3e')} |"
                  for m in analysis["milestones"]]
    else:
        lines.append("No train losses were logged.")
    phases = analysis["phases"]
    lines += ["", "## Phases of the loss curve", ""]
    if phases["found"]:
        lines += ["| phase | steps | smoothed loss | decline per step |", "|---|---|---|---:|"]
        lines += [f"| {p['name']} | {p['start_step']}-{p['end_step']} | {p['start_loss']:.4f} -> "
                  f"{p['end_loss']:.4f} | {p['decline_per_step']:.3g} |" for p in phases["phases"]]
        lines += ["", phases["text"], "", f"Rule: {phases['rule']}"]
    else:
        lines.append(phases["text"])
    for heading, key in (("Mean train loss vs final loss", "mean_vs_final"), ("End of the run", "end_fluctuation"),
                         ("Overfitting", "overfitting"), ("Which checkpoint to use", "checkpoint"),
                         ("Throughput and cost", "throughput"), ("What the model says", "samples")):
        lines += ["", f"## {heading}", "", analysis[key]["text"]]
    lines += ["", "## Warnings recorded in the run", ""]
    lines += [f"- step {w['step']} ({w['check']}): {w['message']}" for w in analysis["warnings"]] or ["None."]
    if analysis["notes"]:
        lines += ["", "## Notes on the input", "", *[f"- {note}" for note in analysis["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m lamelm_fast.explain",
                            description="Explain a training run: milestones, loss phases, overfitting, which "
                                        "checkpoint to use, throughput.")
    parser.add_argument("run", metavar="RUN_DIR", help="lamelm-fast run directory, HF trainer_state.json, HF "
                                                       "checkpoint or output directory")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown",
                        help="Markdown report (default) or the same analysis as one JSON object")
    args = parser.parse_args(argv)
    try:
        analysis = analyse(load_run(args.run))
    except RunReadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a directory we may not list
        print(f"error: {args.run}: cannot read ({error.strerror or error}); {EXPECTED}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(analysis, indent=2, allow_nan=False))
    else:
        print(to_markdown(analysis), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
