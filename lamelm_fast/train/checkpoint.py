"""Checkpoints: weights (PEFT adapter or safetensors model), optimizer, scheduler, RNG and data position.

A checkpoint is written into a temporary directory, fsynced, then renamed into place, so a crash never
leaves a half-written ``checkpoint-N``. Loading restores everything needed for an exact resume.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamelm_fast.train.config import ConfigError

STATE_FILE = "training_state.pt"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


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


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (temporary directories are not matched)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, tokenizer: Any, training_state: dict[str, Any],
                    save_total_limit: int | None = None, keep: Path | None = None) -> Path:
    """Atomic save; then prune to ``save_total_limit``, never deleting the new one or ``keep`` (the best)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    temporary = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    model.save_pretrained(temporary, safe_serialization=True)  # PEFT: adapter only; full: safetensors model
    tokenizer.save_pretrained(temporary)
    torch.save({**training_state, "rng": rng_state()}, temporary / STATE_FILE)
    _fsync_tree(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_dir(run_dir)
    if save_total_limit is not None:
        protected = {final, keep}
        prunable = [p for p in list_checkpoints(run_dir) if p not in protected]
        for old in prunable[:max(0, len(prunable) + len(protected - {None}) - save_total_limit)]:
            shutil.rmtree(old)
    return final


def resolve_resume_path(resume_from: str, run_dir: str | Path) -> Path:
    if resume_from.lower() in ("latest", "true", "last"):
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise ConfigError(f"--resume-from-checkpoint {resume_from}: no checkpoint in {run_dir}: "
                              "check --output-dir, or start without --resume-from-checkpoint")
        return checkpoints[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume-from-checkpoint {resume_from}: not a checkpoint directory "
                          f"(no {STATE_FILE}): give a checkpoint-N directory or 'latest'")
    return path


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
