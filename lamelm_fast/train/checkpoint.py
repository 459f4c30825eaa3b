"""Checkpoints: weights (PEFT adapter or safetensors model), optimizer, scheduler, RNG, data position, and a manifest.

A checkpoint is written into a temporary directory with a manifest of every file's size and SHA-256, fsynced, then
renamed into place, so a crash never leaves a half-written ``checkpoint-N``; a failed write (a full disk) removes
the temporary directory and leaves the previous checkpoints as they were. Loading verifies the manifest first, and
``latest`` skips a damaged checkpoint for the newest intact one. Under torchrun every rank takes part in gathering
the state and rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from lamelm_fast.metrics.logger import CHECKPOINT_ROWS_FILE, unpack_rows
from lamelm_fast.train.config import ConfigError, first_line
from lamelm_fast.train.data import LABELS_VERSION
from lamelm_fast.train.distributed import Distributed
from lamelm_fast.train.faults import TrainingStopped

STATE_FILE = "training_state.pt"
ROWS_FILE = CHECKPOINT_ROWS_FILE  # the rows logged up to the checkpoint's step, for a resume in another directory
MANIFEST_FILE = "manifest.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PATTERN = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {str(item.relative_to(directory)): {"bytes": item.stat().st_size, "sha256": _sha256(item)}
             for item in sorted(directory.rglob("*")) if item.is_file()}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def verify_checkpoint(path: Path, checksums: bool = True) -> str | None:
    """None when every file in the manifest is there with its size (and checksum); else what is wrong, in words."""
    try:
        files = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST_FILE} is missing or unreadable (an incomplete copy, or not a lamelm-fast checkpoint)"
    for name, (size, sha256) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is truncated or changed ({file.stat().st_size} bytes, {size} expected)"
        if checksums and _sha256(file) != sha256:
            return f"{name} is corrupted (its SHA-256 does not match the manifest)"
    return None


# --------------------------------------------------------------------------- saving


def _write(final: Path, model: nn.Module, tokenizer: Any, training_state: dict[str, Any],
           model_state: dict[str, torch.Tensor] | None, rows: bytes | None) -> None:
    """temp dir + manifest + fsync + rename; on a failed write the temp dir goes and nothing else changes."""
    run_dir = final.parent
    temporary = run_dir / f".{final.name}.tmp"
    try:
        temporary.mkdir()
        # PEFT: adapter only; full: a safetensors model. model_state: the whole tensors gathered from FSDP shards.
        # The vocabulary is never resized here, so PEFT need not save the embeddings, nor ask the hub at each save
        # whether the base's vocabulary differs (a request per save; retried for ~30 s with the hub out of reach).
        peft_only = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        model.save_pretrained(temporary, safe_serialization=True, state_dict=model_state, **peft_only)
        tokenizer.save_pretrained(temporary)
        torch.save(training_state, temporary / STATE_FILE)
        if rows is not None:
            (temporary / ROWS_FILE).write_bytes(rows)
        _write_manifest(temporary)
        _fsync_tree(temporary)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch.save and safetensors wrap OSError
        shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        free = shutil.disk_usage(run_dir).free / 1e9
        # torch.save reports a full disk in its own words ("enforce fail ... unexpected pos"): say it plainly.
        full = "the disk is full: " if free < 0.1 else ""
        raise TrainingStopped(
            f"could not save {final} ({full}{first_line(error)}; {free:.2f} GB free on that disk): nothing was left "
            f"half-written and {kept}; free space (or fix the directory), then "
            + ("resume with --resume-from-checkpoint latest" if previous else "run the same command again"),
            exit_code=1) from None
    # Replacing a checkpoint of the same step: move the old one aside first, so one is always complete on disk.
    aside = run_dir / f".{final.name}.old"
    if final.exists():
        os.replace(final, aside)
    os.replace(temporary, final)
    _fsync_dir(run_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(run_dir: Path, save_total_limit: int, protected: set[Path]) -> None:
    """Delete the oldest checkpoints beyond the limit, never a protected one (the new one, the best one)."""
    prunable = [p for p in list_checkpoints(run_dir) if p not in protected]
    for old in prunable[:max(0, len(prunable) + len(protected) - save_total_limit)]:
        shutil.rmtree(old)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, tokenizer: Any, training_state: dict[str, Any],
                    distributed: Distributed, save_total_limit: int | None = None, keep: Path | None = None,
                    rows: bytes | None = None) -> Path:
    """Gather (every rank), write atomically (rank 0), then prune to ``save_total_limit``. ``rows``: the logged rows
    (:meth:`RunLogger.packed_rows`, rank 0's), written as ``ROWS_FILE``.

    The new checkpoint is checked against its manifest (the sizes: the checksums were just computed from these
    files) before any older one is deleted, so pruning never removes the last intact checkpoint. A failed save
    raises TrainingStopped on every rank.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    model_state = distributed.full_model_state(model)
    state = {**training_state, "rng": distributed.gather(rng_state())}
    error = None
    if distributed.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            for leftover in run_dir.iterdir():  # from a run killed while saving
                if TEMPORARY_PATTERN.match(leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
            _write(final, model, tokenizer, state, model_state, rows)
            problem = verify_checkpoint(final, checksums=False)
            if problem is not None:
                raise TrainingStopped(f"{final} did not verify after saving ({problem}): older checkpoints are "
                                      "kept; check the disk", exit_code=1)
            if save_total_limit is not None:
                _prune(run_dir, save_total_limit, {final} | ({keep} if keep else set()))
        except TrainingStopped as stopped:
            error = str(stopped)
    error = distributed.from_main(error)
    if error is not None:
        raise TrainingStopped(error, exit_code=1)
    return final


# --------------------------------------------------------------------------- loading


def check_output_dir(run_dir: Path, resuming: bool, overwrite: bool) -> list[Path]:
    """Refuse an --output-dir that is a file, or one holding an earlier run's checkpoints when this run starts
    afresh (its checkpoints would mix with theirs, and ``latest`` would pick theirs). Returns the checkpoints that
    --overwrite-output-dir deletes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output-dir {run_dir} is a file: give a directory")
    earlier = [] if resuming else list_checkpoints(run_dir)
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[-3:])
        raise ConfigError(f"--output-dir {run_dir} holds checkpoints of an earlier run ({names}): continue it with "
                          "--resume-from-checkpoint latest, start afresh in another --output-dir, or add "
                          "--overwrite-output-dir to delete them")
    return earlier


def checkpoints_after(step: int, run_dir: Path, overwrite: bool) -> list[Path]:
    """Refuse to resume into an --output-dir holding intact checkpoints after the resumed ``step`` (a run rewound
    in place): this run's checkpoints would mix with theirs, pruning would keep theirs and ``latest`` would resume
    them. Returns those that --overwrite-output-dir deletes. (Damaged ones, which ``latest`` skipped, are left to be
    replaced.)"""
    later = [p for p in list_checkpoints(run_dir)
             if int(CHECKPOINT_PATTERN.match(p.name).group(1)) > step and verify_checkpoint(p) is None]
    if later and not overwrite:
        names = ", ".join(p.name for p in later[-3:])
        raise ConfigError(f"--output-dir {run_dir} holds checkpoints after step {step}, the one resumed ({names}): "
                          "this run's checkpoints would mix with theirs (pruning would keep theirs, latest would "
                          "resume them). Resume the newest with --resume-from-checkpoint latest, move them elsewhere, "
                          "or add --overwrite-output-dir to delete them")
    return later


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories in ``run_dir``, oldest first (temporary directories are not matched)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


@dataclass
class ResumePoint:
    path: Path
    notes: list[str] = field(default_factory=list)  # damaged checkpoints skipped on the way, for the banner


def find_resume_checkpoint(resume_from: str, run_dir: str | Path) -> ResumePoint:
    """The checkpoint to resume from, verified; ``latest`` walks back past damaged ones to the newest intact one."""
    if resume_from.lower() in ("latest", "true", "last"):
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise ConfigError(f"--resume-from-checkpoint {resume_from}: no checkpoint in {run_dir}: "
                              "check --output-dir, or start without --resume-from-checkpoint")
        notes = []
        for path in reversed(checkpoints):
            problem = verify_checkpoint(path)
            if problem is None:
                return ResumePoint(path, notes)
            notes.append(f"{path} is damaged ({problem}): skipped")
        raise ConfigError(f"--resume-from-checkpoint {resume_from}: no intact checkpoint in {run_dir} "
                          f"({'; '.join(notes)}): start without --resume-from-checkpoint")
    path = Path(resume_from)
    if not path.is_dir():
        raise ConfigError(f"--resume-from-checkpoint {resume_from}: not a checkpoint directory: give a "
                          "checkpoint-N directory or 'latest'")
    problem = verify_checkpoint(path)
    if problem is not None:
        intact = [p for p in list_checkpoints(path.parent) if p != path and verify_checkpoint(p) is None]
        fix = f"resume from {intact[-1]} instead" if intact else "start without --resume-from-checkpoint"
        raise ConfigError(f"--resume-from-checkpoint {resume_from}: the checkpoint is damaged ({problem}): {fix}")
    return ResumePoint(path)


def _load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def load_weights(path: Path, model: nn.Module) -> None:
    """Restore trainable weights in place: the adapter for PEFT models, the whole model otherwise."""
    tensors = _load_safetensors_dir(path)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(f"{path}: adapter does not match the model ({unexpected[0]} ...): resume with the "
                              "same --model and LoRA settings")
        return
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the model ({(missing or unexpected)[0]} ...): resume "
                          "with the same --model")


def load_training_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def load_rows(path: Path, state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The rows logged up to the checkpoint's step (``state``: its training state); None from a version that saved
    none. The version before ``ROWS_FILE`` kept them in the training state."""
    rows_file = path / ROWS_FILE
    packed = rows_file.read_bytes() if rows_file.is_file() else state.get("history")
    return None if packed is None else unpack_rows(packed)


# The training state's entry for the moment the run's chat templates read as now (ISO 8601): a resumed run
# tokenizes with it, so a template that writes the date renders the data as the run's first day did.
TEMPLATE_TIME = "chat_template_time"


def saved_template_time(state: dict[str, Any] | None) -> datetime | None:
    """The moment a checkpoint's data were tokenized at; None for no checkpoint, or one saved by an older version."""
    saved = state.get(TEMPLATE_TIME) if state is not None else None
    return None if saved is None else datetime.fromisoformat(saved)


# The training state's entry for the labels version (data.LABELS_VERSION) its data fingerprint was computed under.
LABELS_VERSION_KEY = "labels_version"

# The settings that decide the tokenized examples and the validation split (the seed draws the split).
DATA_SETTINGS = ("dataset", "dataset_split", "dataset_format", "max_seq_length", "train_on_prompt", "eval_split_ratio",
                 "seed")


def check_same_data(state: dict[str, Any], fingerprint: str, path: Path, ignore_change: bool,
                    settings: dict[str, Any], writes_date: bool) -> str | None:
    """Refuse (ConfigError) to resume on data that differs from the checkpoint's; with ``ignore_change``, a note.
    The message names the data settings that differ from the checkpoint's (``settings``: this run's), or the date
    when the chat template writes one (``writes_date``) and the checkpoint does not say which it tokenized with; a
    checkpoint of another labels version (``data.LABELS_VERSION``) was tokenized by other rules."""
    if state["data_fingerprint"] == fingerprint:
        return None
    saved = state.get("config", {})
    changed = [f"--{name.replace('_', '-')} {saved[name]} -> {settings[name]}" for name in DATA_SETTINGS
               if name in saved and saved[name] != settings[name]]
    labels = state.get(LABELS_VERSION_KEY, 1)  # absent: saved before labelling had versions
    relabelled = labels != LABELS_VERSION  # not the user's doing: say so, rather than blame the data
    if relabelled:
        why = (f"this lamelm-fast version tokenizes or labels records differently from the one that saved the "
               f"checkpoint (labels version {labels} -> {LABELS_VERSION})"
               + (f"; also changed: {', '.join(changed)}" if changed else ""))
    elif changed:
        why = f"changed: {', '.join(changed)}"
    elif writes_date and TEMPLATE_TIME not in state:
        why = ("the dataset file, the tokenizer or the date the chat template writes changed (the checkpoint was "
               "saved by an older version, which does not record the day its data were tokenized on); the data "
               "settings are the same")
    else:
        why = "the dataset file or the tokenizer changed; the data settings are the same"
    what = f"the training data differs from what {path} was trained on ({why})"
    if ignore_change:
        return (f"{what}: {'continuing on the new labels' if relabelled else 'resuming anyway'} "
                "(--ignore-data-change), from the same step and example position")
    raise ConfigError(f"{what}: " + (
        "--ignore-data-change continues on the new labels; or resume with the lamelm-fast version that saved the "
        "checkpoint" if relabelled else "resuming would not continue the original run; restore the original data, "
        "or pass --ignore-data-change to resume on the new data anyway"))


# Settings a resumed run takes from its own command (schedule shape, batch, clipping: as the HF Trainer, whose
# clipping is its own), and those the checkpoint's optimizer state brings back, as it brings back the learning
# rate's peak (HF's optimizer state does the same).
RESUMED_WITH_NEW_VALUES = ("lr_scheduler_type", "warmup_ratio", "warmup_steps", "per_device_train_batch_size",
                           "gradient_accumulation_steps", "max_grad_norm")
RESUMED_WITH_SAVED_VALUES = ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


def changed_settings_notes(state: dict[str, Any], settings: dict[str, Any], path: Path, step: int) -> list[str]:
    """Banner notes on training settings that differ from the checkpoint's (``settings``: this run's): a resumed
    run that does not continue the saved one exactly says so, and says which value it uses."""
    saved = state.get("config", {})

    def changes(names: tuple[str, ...]) -> str:
        return ", ".join(f"--{name.replace('_', '-')} {saved[name]} -> {settings[name]}" for name in names
                         if name in saved and saved[name] != settings[name])

    notes = []
    if new := changes(RESUMED_WITH_NEW_VALUES):
        notes.append(f"changed since {path}: {new}; the new values apply from step {step + 1} on, so the run "
                     "departs from an uninterrupted one there")
    if kept := changes(RESUMED_WITH_SAVED_VALUES):
        notes.append(f"changed since {path}: {kept}; the checkpoint's values are kept (they are its optimizer "
                     "state, as the learning rate's peak is): start a new run to change them")
    return notes


def restore_rng(states: list[dict[str, Any]], rank: int, world_size: int) -> str | None:
    """Each rank's saved RNG state; a note when the checkpoint came from another number of ranks."""
    if rank < len(states):
        set_rng_state(states[rank])
    if len(states) == world_size:
        return None
    return (f"the checkpoint was saved by {len(states)} process(es), this run has {world_size}: exact for the "
            "weights, optimizer and data position; dropout draws new random masks")
