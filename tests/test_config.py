"""One config behind CLI, YAML and Python; bad input gives one clear line and exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ForkedCli
from lamelm_fast.train.cli import parse_config
from lamelm_fast.train.config import ConfigError, TrainConfig, resolve, validate


def test_cli_flags_are_hf_names_and_fill_the_dataclass() -> None:
    config = parse_config(["--learning-rate", "3e-4", "--per-device-train-batch-size", "3",
                           "--gradient-accumulation-steps", "2", "--lr-scheduler-type", "linear",
                           "--warmup-ratio", "0.1", "--bf16", "--no-packing", "--lora-target-modules", "q_proj,v_proj",
                           "--max-steps", "7", "--finetune", "lora", "--eval-steps", "none"])
    assert config == TrainConfig(learning_rate=3e-4, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                                 lr_scheduler_type="linear", warmup_ratio=0.1, bf16=True, packing=False,
                                 lora_target_modules=["q_proj", "v_proj"], max_steps=7, finetune="lora")


def test_yaml_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning-rate: 1.0e-4\nper_device_train_batch_size: 2\nbf16: true\nseed: 7\n")
    config = parse_config(["--config", str(path), "--seed", "11"])
    assert (config.learning_rate, config.per_device_train_batch_size, config.bf16, config.seed) == (1e-4, 2, True, 11)


def test_yaml_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0e-4\nlearnig_rate: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown setting 'learnig_rate'"):
        parse_config(["--config", str(path)])


def test_several_yaml_files_layer_in_order_and_one_setting_is_spelled_once(tmp_path: Path) -> None:
    """Each --config overrides the earlier ones key by key (not file by file); a key given in both spellings in one
    file is refused rather than one of them silently winning; a kebab-case typo is answered in kebab case."""
    base, override = tmp_path / "base.yaml", tmp_path / "override.yaml"
    base.write_text("finetune: lora\nlearning_rate: 1.0e-4\nseed: 7\n")
    override.write_text("learning-rate: 3.0e-4\n")
    config = parse_config(["--config", str(base), "--config", str(override), "--seed", "9"])
    assert (config.finetune, config.learning_rate, config.seed) == ("lora", 3e-4, 9)
    both = tmp_path / "both.yaml"
    both.write_text("max_steps: 3\nmax-steps: 4\n")
    with pytest.raises(ConfigError, match=r"both.yaml: 'max_steps' and 'max-steps' are the same setting: keep one"):
        parse_config(["--config", str(both)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("learnig-rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'learnig-rate' \(did you mean learning-rate\?\)"):
        parse_config(["--config", str(typo)])


@pytest.mark.parametrize("value", ["-1e-3", "-1E+2", "-2.5e-4", "-.5"])
def test_a_negative_number_in_scientific_notation_is_a_value_not_a_flag(value: str) -> None:
    """argparse alone reads -1e-3 as an unknown option ("expected one argument"); it is the value, which validation
    then refuses by name."""
    config = parse_config(["--learning-rate", value])
    assert config.learning_rate == float(value)
    with pytest.raises(ConfigError, match="learning_rate must be"):
        validate(config)


def test_wrong_type_and_range_errors() -> None:
    with pytest.raises(ConfigError, match="per_device_train_batch_size: expected int, got 'two'"):
        parse_config(["--per-device-train-batch-size", "two"])
    with pytest.raises(ConfigError, match="eval_split_ratio must be in"):
        validate(TrainConfig(eval_split_ratio=1.5))
    with pytest.raises(ConfigError, match="lr_scheduler_type: invalid value 'cosin'"):
        validate(TrainConfig(lr_scheduler_type="cosin"))


def test_the_python_api_gets_the_same_checks_and_coercion_as_the_cli(tmp_path: Path) -> None:
    from lamelm_fast.train import train
    from lamelm_fast.train.config import checked

    for bad, message in ((dict(finetune="LoRA"), "finetune: invalid value 'LoRA'; choose one of qlora, lora, full"),
                         (dict(dataset_format="sharegpt"), "dataset_format: invalid value 'sharegpt'"),
                         (dict(max_steps=2.5), "max_steps: expected int, got 2.5"),
                         (dict(learning_rate="fast"), "learning_rate: expected float, got 'fast'")):
        with pytest.raises(ConfigError, match=f"TrainConfig: {message}"):
            train(TrainConfig(output_dir=str(tmp_path / "run"), **bad))
    assert not (tmp_path / "run").exists()
    # What the CLI accepts as text, the API accepts too: the same coercion.
    config = checked(TrainConfig(learning_rate="1e-3", report_to="tensorboard", lora_target_modules="q_proj,v_proj"))
    assert (config.learning_rate, config.report_to, config.lora_target_modules) == (1e-3, ["tensorboard"],
                                                                                    ["q_proj", "v_proj"])
    assert checked(TrainConfig()) == TrainConfig()


def test_names_from_other_tools_get_our_name_as_the_hint(tmp_path: Path, cli: ForkedCli) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'lr' \(did you mean learning_rate\?\)"):
        parse_config(["--config", str(path)])
    path.write_text("batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"did you mean per_device_train_batch_size\?"):
        parse_config(["--config", str(path)])
    result = cli.run("--lr", "1e-3", cwd=tmp_path)  # not a prefix of --lr-scheduler-type
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown flag --lr (did you mean --learning-rate?) (see --help)"


def test_resolve_picks_model_dependent_defaults_once() -> None:
    embedded = resolve(TrainConfig())
    assert (embedded.finetune, embedded.learning_rate, embedded.max_seq_length) == ("full", 4e-3, 256)
    real = resolve(TrainConfig(model="org/name"), model_context=4096)
    assert (real.finetune, real.learning_rate, real.max_seq_length) == ("qlora", 2e-4, 2048)
    assert resolve(TrainConfig(model="org/name", finetune="full"), 4096).learning_rate == 2e-5
    with pytest.raises(ConfigError, match="longer than the model's context"):
        resolve(TrainConfig(model="org/name", max_seq_length=9000), model_context=4096)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """In a fresh interpreter. (The error cases run in conftest's ForkedCli: the same, without ~4 s of imports each;
    one of them here too.)"""
    return subprocess.run([sys.executable, "-m", "lamelm_fast.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


BAD_INPUTS = {
    "missing_model": (["--model", "./no/such/model"], "model directory ./no/such/model not found"),
    "unknown_flag_value": (["--finetune", "qlorax"], "finetune: invalid value 'qlorax'"),
    "unknown_flag": (["--learnig-rate", "1"], "unknown flag --learnig-rate (did you mean --learning-rate?)"),
    "missing_dataset": (["--dataset", "nope.jsonl"], "dataset file nope.jsonl not found"),
    "context": (["--max-seq-length", "5000"], "longer than the model's context (1024"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, cli: ForkedCli) -> None:
    args, message = BAD_INPUTS[case]
    result = cli.run(*args, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "data.jsonl:2: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "data.jsonl:2: missing field 'output'"),
    ('{"instruction": "a", "output": 5}\n', "data.jsonl:1: field 'output' must be a string, got int"),
    ('{"prompt": "a", "answer": "b"}\n', "cannot tell the dataset format"),
    ("\n\n", "has no records"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "messages[0] has unknown role 'robot'"),
    # truncated away: found after loading the model and tokenizing, the most a failing run does; in a fresh
    # interpreter, so that nothing its imports print escapes the check either
    pytest.param('{"instruction": "' + "explain " * 20 + '", "output": "x"}\n', "every label in", id="fresh-process"),
])
def test_bad_dataset_exits_2_naming_file_line_field(content: str, message: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    (tmp_path / "data.jsonl").write_text(content)
    args = ("--dataset", "data.jsonl", "--max-seq-length", "8", "--output-dir", "run")
    fresh = request.node.callspec.id == "fresh-process"
    result = run_cli(*args, cwd=tmp_path) if fresh else request.getfixturevalue("cli").run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_every_field(cli: ForkedCli) -> None:
    result = cli.run("--help", timeout=120)
    assert result.returncode == 0
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in result.stdout


def test_embedded_default_trains_from_the_cli(
        embedded_default_cli_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    """`make train` in small: no --model, no --dataset; the banner explains the choice, the loss falls. (The run is
    shared with test_reporting.py: conftest's embedded_default_cli_run.)"""
    result, run = embedded_default_cli_run
    assert result.returncode == 0, result.stderr
    assert "full fine-tuning of embedded tiny Llama" in result.stdout and "trained in full" in result.stdout
    assert "packed batches: one causal sdpa over the sequences padded to the longest" in result.stdout  # no mask
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["type"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(5, 61, 5))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.8
    assert rows[-1]["type"] == "eval" and rows[-1]["val_loss"] < 7.0  # ln(4096) = 8.3 at random init
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and (run / "checkpoint-60" / "model.safetensors").is_file()


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path: Path, cli: ForkedCli) -> None:
    process = cli.popen("--logging-steps", "1", "--output-dir", "run", cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "training_state.pt").is_file()
    assert f"SIGINT at step {checkpoints[0].name.split('-')[1]}" in stderr
    assert f"--resume-from-checkpoint {Path('run') / checkpoints[0].name}" in stderr


def test_kernels_flag_refuses_a_backend_that_cannot_run_here(tmp_path, monkeypatch) -> None:
    from lamelm_fast.train import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU machine without the interpreter cannot run Triton
    with pytest.raises(ConfigError, match="--kernels triton: .*TRITON_INTERPRET"):
        train(TrainConfig(kernels="triton", max_steps=1, output_dir=str(tmp_path / "run")))
    monkeypatch.setenv("LAMELM_KERNELS", "triton")  # --kernels auto follows it: the error names the variable
    with pytest.raises(ConfigError, match=r"LAMELM_KERNELS=triton \(which --kernels auto follows\): .*; or unset "
                                          "LAMELM_KERNELS"):
        train(TrainConfig(max_steps=1, output_dir=str(tmp_path / "run")))
    from lamelm_fast.ops import dispatch

    dispatch.set_backend("triton")  # pinned from Python, which --kernels auto follows before the variable
    try:
        with pytest.raises(ConfigError, match=r"set_backend\('triton'\) \(pinned in this process, which --kernels "
                                              r"auto follows\): .*; or set_backend\(None\)"):
            train(TrainConfig(max_steps=1, output_dir=str(tmp_path / "run")))
    finally:
        dispatch.set_backend(None)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_stops_without_saving(
        capsys: pytest.CaptureFixture[str]) -> None:
    from lamelm_fast.train.loop import _stderr, _StopRequest

    with _StopRequest(_stderr) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in the main thread between bytecodes
        assert stop.signal_name == "SIGINT"
        assert "SIGINT: stopping after the current step and saving a checkpoint (Ctrl-C again to stop now" in (
            capsys.readouterr().err)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# `python -m lamelm_fast.train ARGS` that stops at POINT until a SIGINT arrives: "torch" blocks its first import,
# "workers" the two processes tokenizing the data (each in its first chunk), any other POINT is a function of the
# loop's module, replaced. It prints "blocked" once there (each worker does).
BLOCKING_TRAINER = """
import os, runpy, signal, sys

point = sys.argv.pop(1)

def wait_for_ctrl_c(*args, **kwargs):
    os.write(1, b"blocked\\n")  # one write: two workers' lines do not interleave
    signal.pause()  # the SIGINT raises KeyboardInterrupt here (or just before, if it came first)

if point == "torch":
    class BlockTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                wait_for_ctrl_c()

    sys.meta_path.insert(0, BlockTorchImport())
elif point == "workers":
    from lamelm_fast.train import data

    data._tokenizing_workers = lambda records: 2  # forked whatever the dataset's size and the CPUs
    data.PARALLEL_CHUNK = 1_000  # the embedded dataset's 3,651 records: 4 chunks
    data._encode_records = wait_for_ctrl_c
else:
    from lamelm_fast.train import loop

    setattr(loop, point, wait_for_ctrl_c)
runpy.run_module("lamelm_fast.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("point", ["torch", "load_model", "prepare_datasets", "workers", "_banner"],
                         ids=["importing torch", "loading the model", "tokenizing the data",
                              "tokenizing in worker processes", "run directory made"])
def test_ctrl_c_before_training_is_one_line_and_leaves_nothing_in_the_way(point: str, tmp_path: Path,
                                                                          request: pytest.FixtureRequest) -> None:
    """Ctrl-C in a terminal signals the whole process group: forked tokenizing workers too, which must neither print
    tracebacks of their own nor outlive the run."""
    from lamelm_fast.train.checkpoint import check_output_dir

    run = tmp_path / "run"
    args = (point, "--max-steps", "1", "--output-dir", str(run))
    # Each in its own process group, as a terminal gives a command. Before torch's import: a fresh interpreter; the
    # other points come after the imports, which conftest's ForkedCli skips.
    if point == "torch":
        process = subprocess.Popen([sys.executable, "-c", BLOCKING_TRAINER, *args], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    else:
        process = request.getfixturevalue("cli").popen(*args, script=BLOCKING_TRAINER, cwd=tmp_path,
                                                       new_session=True)
    try:
        for _ in range(2 if point == "workers" else 1):
            assert process.stdout.readline() == "blocked\n"
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)  # till every process holding its stdout and stderr has exited
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with pytest.raises(ProcessLookupError):  # nothing left in the group: the workers were stopped, and waited for
        os.killpg(process.pid, 0)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "Interrupted before training started: nothing to save."
    assert not run.exists() or sorted(path.name for path in run.iterdir()) == ["metrics.jsonl"]
    assert check_output_dir(run, resuming=False, overwrite=False) == []  # the next start is not refused


def test_ctrl_c_after_the_last_step_stops_at_once_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """In the final evaluation (as for a second Ctrl-C in training): not reported as before training started."""
    from lamelm_fast.train import cli, loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate", interrupted)
    assert cli.main(["--max-steps", "2", "--save-steps", "1", "--output-dir", str(tmp_path / "run"), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: stopped at once; nothing was saved since the last "
                                               "checkpoint")
    # The final evaluation comes before the final checkpoint: the one saved at step 1 is the last.
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_missing_tracker_package_is_refused_before_anything_is_written(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from lamelm_fast.train import train

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("kept\n")
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package"):
        train(TrainConfig(report_to=["wandb"], output_dir=str(run), max_steps=1))
    assert (run / "metrics.jsonl").read_text() == "kept\n"


def test_settings_a_run_does_not_use_are_named() -> None:
    from lamelm_fast.train.config import unused_settings

    assert unused_settings(resolve(TrainConfig())) == []
    notes = unused_settings(resolve(TrainConfig(lora_r=64, lora_target_modules=["q_proj"], eval_split_ratio=0.0,
                                                eval_steps=5)))
    assert notes == ["--lora-r, --lora-target-modules apply to LoRA and QLoRA: not used by --finetune full",
                     "--eval-steps does nothing without a validation set: set --eval-split-ratio > 0"]
    assert unused_settings(resolve(TrainConfig(model="x", lora_r=64))) == []  # qlora uses it


def test_a_split_that_holds_out_nothing_is_said_or_refused() -> None:
    """One example with targets stays in training whatever --eval-split-ratio says: the banner says so, and settings
    that need evaluations are refused as with --eval-split-ratio 0, instead of silently doing nothing."""
    from lamelm_fast.train.config import empty_validation_note

    assert empty_validation_note(TrainConfig(eval_split_ratio=0.1), 1, 1) is None  # a validation set exists
    assert empty_validation_note(TrainConfig(eval_split_ratio=0.0), 1, 0) is None  # none was asked for
    note = empty_validation_note(TrainConfig(eval_split_ratio=0.1, eval_steps=1), 1, 0)
    assert note.startswith("--eval-split-ratio 0.1 holds out no validation example") and "--eval-steps" in note
    for setting, flag in ((dict(early_stopping_patience=2, eval_steps=1), "--early-stopping-patience"),
                          (dict(eval_samples=2), "--eval-samples")):
        with pytest.raises(ConfigError, match=f"so {flag} would have nothing to evaluate"):
            empty_validation_note(TrainConfig(eval_split_ratio=0.1, **setting), 1, 0)
