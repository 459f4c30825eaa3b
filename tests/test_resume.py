"""Exact resume after kill -9, checkpoints verified on load, save_total_limit, changed data refused (and data
that a chat template dates not taken for changed)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ForkedCli, as_saved_by_an_older_version, chat_records, embedded_records, set_clock, write_jsonl
from lamelm_fast.train import ConfigError, TrainConfig, TrainingStopped, loop, train
from lamelm_fast.train import checkpoint as checkpoint_module
from lamelm_fast.train.checkpoint import find_resume_checkpoint, load_training_state, verify_checkpoint
from lamelm_fast.train.cli import main
from lamelm_fast.train.data import LABELS_VERSION

# LoRA dropout and shuffling across epochs: the RNG and the data position must both come back.
SETTINGS = dict(finetune="lora", lora_dropout=0.2, learning_rate=5e-3, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_steps=12, save_steps=1, logging_steps=1, shuffle=True,
                max_seq_length=128, eval_split_ratio=0.0, seed=7)


def config(model_dir: Path, dataset: Path, output_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(model=str(model_dir), dataset=str(dataset), output_dir=str(output_dir), quiet=True,
                       **{**SETTINGS, **overrides})


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# `python -m lamelm_fast.train ARGS` with as many intra-op threads as the tests' own process (the losses of a step
# depend on how its sums are split), given as the first argument.
THREADS_AS_GIVEN = """
import runpy, sys
import torch

torch.set_num_threads(int(sys.argv.pop(1)))
runpy.run_module("lamelm_fast.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_latest_equals_an_uninterrupted_run(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, cli: ForkedCli) -> None:
    reference = train(config(tiny_model_dir, small_alpaca, tmp_path / "reference"))
    expected = {row["step"]: row["loss"] for row in reference.history if row["type"] == "train"}

    kill_at = random.randrange(2, 11)  # any step: the kill may land in a step, a log write or a checkpoint write
    run_dir = tmp_path / "killed"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    process = cli.popen(str(torch.get_num_threads()), "--model", str(tiny_model_dir), "--dataset", str(small_alpaca),
                        "--output-dir", str(run_dir), "--log-format", "json", *flags, script=THREADS_AS_GIVEN)
    try:
        while line := process.stdout.readline():
            if json.loads(line).get("step") == kill_at:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()  # (and waited for)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"

    resumed = train(config(tiny_model_dir, small_alpaca, run_dir, resume_from_checkpoint="latest"))
    losses = {row["step"]: row["loss"] for row in resumed.history if row["type"] == "train"}  # the resumed rows last
    assert sorted(losses) == sorted(expected), f"killed at step {kill_at}"
    for step, loss in expected.items():
        assert rel(losses[step], loss) < 1e-6, f"step {step} (killed at step {kill_at})"
    final = load_file(str(run_dir / "checkpoint-12" / "adapter_model.safetensors"))
    for key, value in load_file(str(reference.run_dir / "checkpoint-12" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-7, msg=f"{key} (killed at step {kill_at})")
    assert not list(run_dir.glob(".checkpoint-*")), "the killed run's temporary directory was not cleaned"
    # metrics.jsonl holds each step once: the killed run's rows after its checkpoint were replaced, not repeated.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["type"] == "train"] == sorted(expected), f"killed at step {kill_at}"


@pytest.fixture(scope="module")
def shared_alpaca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", embedded_records(48))


@pytest.fixture
def small_alpaca(shared_alpaca: Path) -> Iterator[Path]:
    """conftest's small_alpaca as one file for the module (the run of three_checkpoints_once was trained on it, and a
    resume on another path names the path as a changed setting), its records restored after each test."""
    records = shared_alpaca.read_bytes()
    yield shared_alpaca
    shared_alpaca.write_bytes(records)


@pytest.fixture(scope="module")
def three_checkpoints_once(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                           shared_alpaca: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("three-checkpoints") / "run"
    train(config(tiny_model_dir, shared_alpaca, run_dir, max_steps=3))
    return run_dir


@pytest.fixture
def three_checkpoints(tmp_path: Path, three_checkpoints_once: Path, small_alpaca: Path) -> Path:
    """A run of 3 steps on ``small_alpaca``, a checkpoint at each: the test's own copy of the module's one run."""
    return shutil.copytree(three_checkpoints_once, tmp_path / "run")


def test_a_damaged_checkpoint_is_detected_and_latest_resumes_from_the_previous_one(
        three_checkpoints: Path, tiny_model_dir: Path, small_alpaca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = three_checkpoints
    assert all(verify_checkpoint(run_dir / f"checkpoint-{n}") is None for n in (1, 2, 3))
    state = run_dir / "checkpoint-3" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    adapter = run_dir / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    adapter.write_bytes(bytes(data))

    assert "training_state.pt is truncated" in verify_checkpoint(run_dir / "checkpoint-3")
    assert "adapter_model.safetensors is corrupted" in verify_checkpoint(run_dir / "checkpoint-2")
    found = find_resume_checkpoint("latest", run_dir)
    assert found.path == run_dir / "checkpoint-1" and len(found.notes) == 2
    with pytest.raises(ConfigError, match=r"checkpoint-3.*damaged \(training_state.pt is truncated.*resume from "
                                          r".*checkpoint-1 instead"):
        find_resume_checkpoint(str(run_dir / "checkpoint-3"), run_dir)

    capsys.readouterr()
    resumed = train(config(tiny_model_dir, small_alpaca, run_dir, max_steps=3, resume_from_checkpoint="latest"))
    assert [row["step"] for row in resumed.history if row["type"] == "train"][-2:] == [2, 3]
    stderr = capsys.readouterr().err  # --quiet (the tests' config) hides the banner, not the steps lost
    assert "checkpoint-3 is damaged" in stderr and "checkpoint-2 is damaged" in stderr
    assert verify_checkpoint(run_dir / "checkpoint-3") is None  # rewritten whole


def test_save_total_limit_never_deletes_the_last_intact_checkpoint(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write_manifest = checkpoint_module._write_manifest

    def manifest_then_damage(directory: Path) -> None:  # a checkpoint that does not verify once written
        real_write_manifest(directory)
        if directory.name == ".checkpoint-2.tmp":
            with (directory / "training_state.pt").open("ab") as handle:
                handle.write(b"garbage")

    monkeypatch.setattr(checkpoint_module, "_write_manifest", manifest_then_damage)
    with pytest.raises(TrainingStopped, match="checkpoint-2 did not verify"):
        train(config(tiny_model_dir, small_alpaca, tmp_path / "run", max_steps=3, save_total_limit=1))
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-1") is None  # not pruned for a bad newer one


def test_changed_data_is_refused_on_resume_unless_ignore_data_change(
        three_checkpoints: Path, tiny_model_dir: Path, small_alpaca: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    records = small_alpaca.read_text().splitlines()
    edited = json.loads(records[3])
    edited["output"] += " changed"
    small_alpaca.write_text("\n".join([*records[:3], json.dumps(edited), *records[4:]]) + "\n")

    flags = [f"--{key.replace('_', '-')}={value}" for key, value in {**SETTINGS, "max_steps": 4}.items()]
    argv = ["--model", str(tiny_model_dir), "--dataset", str(small_alpaca), "--output-dir", str(three_checkpoints),
            "--resume-from-checkpoint", "latest", "--quiet", *flags]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "the training data differs from what" in error
    assert "--ignore-data-change" in error
    assert not (three_checkpoints / "checkpoint-4").exists()

    assert main([*argv, "--ignore-data-change"]) == 0
    assert (three_checkpoints / "checkpoint-4").is_dir()


SAVED_AT = Path("run") / "checkpoint-3"


def saved_state(labels_version: int | None, **settings: object) -> dict:
    """A checkpoint's training state: the data settings of ``config`` (and ``settings``), a fingerprint of other data,
    and ``labels_version`` (None: saved before labels had versions)."""
    state = {"data_fingerprint": "saved", "config": dataclasses.asdict(config(Path("m"), Path("d"), Path("o"),
                                                                              **settings))}
    return state if labels_version is None else {**state, checkpoint_module.LABELS_VERSION_KEY: labels_version}


@pytest.mark.parametrize("labels_version", [None, 1], ids=["saved before labels had versions", "labels version 1"])
def test_a_checkpoint_of_another_labels_version_names_the_labelling_not_the_data(labels_version: int | None) -> None:
    """Unchanged data that this version tokenizes or labels differently: the message does not blame the data."""
    settings = saved_state(None)["config"]
    relabelled = (rf"the training data differs from what {SAVED_AT} was trained on \(this lamelm-fast version "
                  r"tokenizes or labels records differently from the one that saved the checkpoint \(labels version "
                  rf"1 -> {LABELS_VERSION}\)")
    with pytest.raises(ConfigError, match=relabelled + r"\): --ignore-data-change continues on the new labels"):
        checkpoint_module.check_same_data(saved_state(labels_version), "now", SAVED_AT, False, settings, False)
    note = checkpoint_module.check_same_data(saved_state(labels_version), "now", SAVED_AT, True, settings, False)
    assert "continuing on the new labels (--ignore-data-change), from the same step" in note
    with pytest.raises(ConfigError, match=relabelled + r"; also changed: --seed 8 -> 7\)"):
        checkpoint_module.check_same_data(saved_state(labels_version, seed=8), "now", SAVED_AT, False, settings, False)
    assert checkpoint_module.check_same_data(saved_state(labels_version), "saved", SAVED_AT, False, settings,
                                             False) is None  # labels the same for this data: resumes


def test_a_checkpoint_of_this_labels_version_on_other_data_is_refused_as_changed_data() -> None:
    settings = saved_state(None)["config"]
    with pytest.raises(ConfigError, match=r"\(the dataset file or the tokenizer changed; the data settings are the "
                                          r"same\): resuming would not continue the original run; restore"):
        checkpoint_module.check_same_data(saved_state(LABELS_VERSION), "now", SAVED_AT, False, settings, False)


def test_a_fresh_run_refuses_an_output_dir_holding_an_earlier_runs_checkpoints(
        three_checkpoints: Path, tiny_model_dir: Path, small_alpaca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Otherwise its checkpoints mix with the earlier run's, and `latest` would later resume the wrong run."""
    fresh = dataclasses.replace(config(tiny_model_dir, small_alpaca, three_checkpoints, max_steps=2,
                                       learning_rate=1e-3), quiet=False)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(checkpoint-1, checkpoint-2, "
                                          r"checkpoint-3\): continue it with --resume-from-checkpoint latest"):
        train(fresh)
    assert sorted(p.name for p in three_checkpoints.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (1, 2, 3)]
    capsys.readouterr()
    train(dataclasses.replace(fresh, overwrite_output_dir=True))
    assert sorted(p.name for p in three_checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert "--overwrite-output-dir: deleted 3 checkpoint(s) of an earlier run" in capsys.readouterr().out
    not_a_dir = three_checkpoints / "a-file"
    not_a_dir.write_text("mine")
    with pytest.raises(ConfigError, match="is a file: give a directory"):
        train(dataclasses.replace(fresh, output_dir=str(not_a_dir)))


def test_resuming_an_older_checkpoint_in_place_refuses_to_mix_with_the_later_ones(
        three_checkpoints: Path, tiny_model_dir: Path, small_alpaca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run rewound in place (resumed from checkpoint-1 beside checkpoint-2 and -3) would mix its checkpoints with
    the abandoned run's: pruning would keep theirs and `latest` would resume them. Refused, unless
    --overwrite-output-dir deletes them."""
    rewind = dataclasses.replace(config(tiny_model_dir, small_alpaca, three_checkpoints, max_steps=3), quiet=False,
                                 resume_from_checkpoint=str(three_checkpoints / "checkpoint-1"))
    with pytest.raises(ConfigError, match=r"holds checkpoints after step 1, the one resumed \(checkpoint-2, "
                                          r"checkpoint-3\).*add --overwrite-output-dir to delete them"):
        train(rewind)
    before = load_file(str(three_checkpoints / "checkpoint-3" / "adapter_model.safetensors"))
    capsys.readouterr()
    train(dataclasses.replace(rewind, overwrite_output_dir=True, max_grad_norm=0.01))  # a different branch
    assert "deleted 2 checkpoint(s) after checkpoint-1, the one resumed" in capsys.readouterr().out
    after = load_file(str(three_checkpoints / "checkpoint-3" / "adapter_model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)  # the new branch's step 3


def test_resume_names_what_it_keeps_from_the_checkpoint_and_what_changed(
        three_checkpoints: Path, tiny_model_dir: Path, small_alpaca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    resume = dict(resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match=r"checkpoint-3 is at step 3 and this run ends at step 3: nothing to train"):
        train(config(tiny_model_dir, small_alpaca, three_checkpoints, max_steps=3, **resume))
    with pytest.raises(ConfigError, match=r"was trained on \(changed: --eval-split-ratio 0.0 -> 0.2, --seed 7 -> 8\)"):
        train(config(tiny_model_dir, small_alpaca, three_checkpoints, max_steps=5, seed=8, eval_split_ratio=0.2,
                     **resume))
    capsys.readouterr()
    result = train(dataclasses.replace(config(tiny_model_dir, small_alpaca, three_checkpoints, max_steps=5,
                                              learning_rate=1e-4, **resume), quiet=False))
    out = capsys.readouterr().out
    assert "the learning-rate schedule continues from" in out and "--learning-rate 0.0001 applies to new runs" in out
    rows = [row for row in result.history if row["type"] == "train"]
    assert [row["step"] for row in rows][-2:] == [4, 5]
    assert rows[-2]["learning_rate"] > 1e-3  # the checkpoint's peak over this run's length
    assert not [row for row in result.history if row["type"] == "warning"]  # no false "LR off its schedule"


def test_resume_names_the_training_settings_that_changed_and_which_value_it_uses(
        three_checkpoints: Path, tiny_model_dir: Path, small_alpaca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new schedule shape, batch or clipping applies from the next step (the run departs from an uninterrupted one
    there); the optimizer's saved hyperparameters are kept, as the learning rate's peak is (both as in the HF
    Trainer). Both are said, not silent."""
    saved = config(tiny_model_dir, small_alpaca, three_checkpoints)
    capsys.readouterr()
    result = train(dataclasses.replace(saved, max_steps=4, resume_from_checkpoint="latest", quiet=False,
                                       lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.5,
                                       weight_decay=0.3))
    out = " ".join(capsys.readouterr().out.split())  # the banner wraps long notes
    assert (f"--lr-scheduler-type {saved.lr_scheduler_type} -> linear, --warmup-steps {saved.warmup_steps} -> 2, "
            f"--max-grad-norm {saved.max_grad_norm} -> 0.5; the new values apply from step 4 on") in out
    assert f"--weight-decay {saved.weight_decay} -> 0.3; the checkpoint's values are kept" in out
    groups = load_training_state(result.checkpoint)["optimizer"]["param_groups"]
    assert [g["max_grad_norm"] for g in groups] == [0.5] * len(groups)  # (the 2-D params' group first)
    assert groups[0]["weight_decay"] == saved.weight_decay != 0.3
    rows = [row for row in result.history if row["type"] == "train"]
    assert rows[-1]["step"] == 4 and not [row for row in result.history if row["type"] == "warning"]


# The day a run starts (an hour before midnight) and the day it resumes on.
STARTED, NEXT_DAY = datetime(2026, 11, 23, 23, 0), datetime(2026, 11, 24, 0, 30)
CHAT = dict(max_seq_length=512)  # the template's header tokens are plain text to the embedded tokenizer: long


@pytest.fixture
def dated_chat(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """The tiny model, its chat template writing today's date as Llama 3.1+'s do; and chat records."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    template = Path(__file__).parent / "data" / "chat_templates" / "llama31_like.jinja"
    shutil.copy(template, model / "chat_template.jinja")
    return model, write_jsonl(tmp_path / "chat.jsonl", chat_records(16))


def test_a_run_resumed_the_next_day_tokenizes_with_the_date_it_started_on(
        tmp_path: Path, dated_chat: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Else the template writes another date after midnight and the resume is refused as if the data had changed."""
    model, dataset = dated_chat
    first_texts, prepare_datasets = [], loop.prepare_datasets

    def prepare_and_decode_the_first(*args, **kwargs):
        prepared = prepare_datasets(*args, **kwargs)
        first_texts.append(args[3].decode(prepared[0][0].input_ids))  # args[3]: the tokenizer
        return prepared

    monkeypatch.setattr(loop, "prepare_datasets", prepare_and_decode_the_first)
    set_clock(monkeypatch, STARTED)
    train(config(model, dataset, tmp_path / "run", max_steps=1, **CHAT))
    set_clock(monkeypatch, NEXT_DAY)
    train(config(model, dataset, tmp_path / "run", max_steps=2, resume_from_checkpoint="latest", **CHAT))
    assert len(first_texts) == 2 and all("Today Date: 23 Nov 2026" in text for text in first_texts)
    # A resume of the resumed run's checkpoint, another day still, tokenizes with the first day's date too.
    state = load_training_state(tmp_path / "run" / "checkpoint-2")
    assert state[checkpoint_module.TEMPLATE_TIME] == "2026-11-23T23:00:00"


def test_a_checkpoint_without_its_date_resumes_the_same_day_and_a_refusal_the_next_names_the_date(
        tmp_path: Path, dated_chat: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint of an older version does not record the date: its data are tokenized with today's."""
    model, dataset = dated_chat
    set_clock(monkeypatch, STARTED)
    train(config(model, dataset, tmp_path / "run", max_steps=1, **CHAT))
    as_saved_by_an_older_version(tmp_path / "run" / "checkpoint-1", checkpoint_module.TEMPLATE_TIME)
    resume = config(model, dataset, tmp_path / "run", max_steps=2, resume_from_checkpoint="latest", **CHAT)
    set_clock(monkeypatch, NEXT_DAY)
    with pytest.raises(ConfigError, match=r"\(the dataset file, the tokenizer or the date the chat template writes "
                                          r"changed \(the checkpoint was saved by an older version, which does not "
                                          r"record the day its data were tokenized on\); the data settings are the "
                                          r"same\): .*--ignore-data-change"):
        train(resume)
    set_clock(monkeypatch, STARTED.replace(hour=23, minute=30))
    assert train(resume).global_step == 2
