"""``python -m lamelm_fast.explain``: a real HF Trainer run, synthetic runs with known shapes, errors, JSON output."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lamelm_fast.explain import (
    PLATEAU_FRACTION,
    RAPID_FRACTION,
    EvalPoint,
    TrainPoint,
    analyse,
    end_fluctuation,
    find_phases,
    load_run,
    main,
    overfitting,
    pick_checkpoint,
)

HF_STEPS, HF_SAVE_STEPS = 24, 8
TAU = 10.0  # decay constant of the synthetic curve's exponential drop, in steps
FLAT_FROM = 60  # the synthetic loss is exactly flat (plus noise) from this step
BEST_VAL_STEP = 100  # the synthetic val loss falls until here, then rises
CHECKPOINTS = (50, 90, 150, 200)  # checkpoint-N directories of the synthetic run


# ---------------------------------------------------------------------------------------------- HF Trainer run


@pytest.fixture(scope="module")
def hf_output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 steps of transformers.Trainer on a tiny Llama: 2 epochs, eval every 6 steps, checkpoints 8, 16, 24."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    generator = torch.Generator().manual_seed(0)

    def rows(count: int) -> list[dict]:
        # Random arithmetic sequences mod 64: random tokens, but learnable, so the loss has a shape to explain.
        starts = torch.randint(0, 64, (count, 1), generator=generator)
        strides = torch.randint(1, 4, (count, 1), generator=generator)
        ids = (starts + strides * torch.arange(16)) % 64
        return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]

    output_dir = tmp_path_factory.mktemp("hf-run")
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=16,
                             max_steps=HF_STEPS, learning_rate=3e-3, logging_steps=1, eval_strategy="steps",
                             eval_steps=6, save_strategy="steps", save_steps=HF_SAVE_STEPS, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=rows(48), eval_dataset=rows(16)).train()
    return output_dir


@pytest.mark.parametrize("target", ["output dir", "checkpoint dir", "state file"])
def test_explains_an_hf_trainer_run(hf_output_dir: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    newest = hf_output_dir / f"checkpoint-{HF_STEPS}"
    path = {"output dir": hf_output_dir, "checkpoint dir": newest, "state file": newest / "trainer_state.json"}[target]
    state = json.loads((newest / "trainer_state.json").read_text())
    logged = {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]

    analysis = analyse(load_run(path))
    table = analysis["milestones"]
    assert table[-1]["step"] == state["global_step"] == HF_STEPS
    assert [row["step"] for row in table] == [1, 12, 24]  # first step, end of epoch 1, end of epoch 2 = last step
    for row in table:
        assert row["loss"] == logged[row["step"]]["loss"]
        assert row["learning_rate"] == logged[row["step"]]["learning_rate"]
    assert analysis["eval_points"] == len(evals) == 4

    saved = sorted(int(p.name.split("-")[1]) for p in hf_output_dir.glob("checkpoint-*"))
    assert analysis["checkpoints"] == saved == [8, 16, 24]
    best_step = min(evals, key=lambda e: e["eval_loss"])["step"]
    expected = max([s for s in saved if s <= best_step], default=saved[0])
    recommendation = analysis["checkpoint"]
    assert recommendation["step"] == expected and "export_command" not in recommendation  # an HF checkpoint
    assert analysis["samples"]["text"] == "The HF Trainer logs no completions."
    assert Path(recommendation["path"]) == hf_output_dir / f"checkpoint-{expected}"
    assert Path(recommendation["path"]).is_dir()

    assert main([str(path)]) == 0
    last_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| end of epoch 2"))
    assert f"| {HF_STEPS} |" in last_row and f"{logged[HF_STEPS]['loss']:.4f}" in last_row


def test_an_earlier_hf_checkpoint_describes_the_run_up_to_it(hf_output_dir: Path) -> None:
    analysis = analyse(load_run(hf_output_dir / "checkpoint-16"))
    assert analysis["last_step"] == 16 and analysis["checkpoints"] == [8, 16]
    assert analysis["checkpoint"]["step"] in (8, 16)


# ---------------------------------------------------------------------------------------------- synthetic runs


def write_run(run_dir: Path, every: int = 1, with_eval: bool = True, summary: dict | None = None) -> Path:
    """A curve of known shape: 3 + 5 exp(-(step - 1) / TAU) until FLAT_FROM, then 3, plus noise of std 0.01."""
    rng = random.Random(0)
    rows = []
    for step in range(every, 201, every):
        loss = 3.0 + 5.0 * math.exp(-(step - 1) / TAU) if step < FLAT_FROM else 3.0
        rows.append({"type": "train", "step": step, "loss": loss + rng.gauss(0.0, 0.01), "grad_norm": 1.0,
                     "learning_rate": 1e-3 * (1 - step / 200), "epoch": step / 80, "token_accuracy": 0.4,
                     "tokens_per_second": 1000.0, "memory_gb": None, "mfu": None, "gpu_util": None})
        if with_eval and step % 20 == 0:
            val = 3.5 + 4.0 * math.exp(-step / 15) + 0.004 * max(0, step - BEST_VAL_STEP)
            rows.append({"type": "eval", "step": step, "epoch": step / 80, "val_loss": val,
                         "val_perplexity": math.exp(val), "val_token_accuracy": 0.3})
        if step == 120:
            rows.append({"type": "warning", "step": step, "check": "grad_norm_spike",
                         "message": "grad norm 12.0 is 10x the running median"})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for step in CHECKPOINTS:
        (run_dir / f"checkpoint-{step}").mkdir()
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


# Logged every 4 steps, the 3-point smoothing spans 12 steps, comparable to TAU: boundaries blur by ~2 intervals.
@pytest.mark.parametrize(("every", "tolerance"), [(1, 3), (4, 8)])
def test_phases_overfitting_and_checkpoint_of_a_known_curve(tmp_path: Path, every: int, tolerance: int) -> None:
    analysis = analyse(load_run(write_run(tmp_path / "run", every=every)))
    phases = analysis["phases"]
    assert phases["found"] and [p["name"] for p in phases["phases"]] == ["rapid decline", "slowing", "plateau"]
    rapid, slowing, plateau = phases["phases"]
    # For an exponential the decline rate falls to a fraction r of its start after TAU ln(1/r) steps, and the
    # remaining drop falls below a fraction f of the total after TAU ln(1/f) steps.
    first = every
    assert rapid["start_step"] == first
    assert rapid["end_step"] == slowing["start_step"] == pytest.approx(first + TAU * math.log(1 / RAPID_FRACTION),
                                                                       abs=tolerance)
    assert slowing["end_step"] == plateau["start_step"] == pytest.approx(first + TAU * math.log(1 / PLATEAU_FRACTION),
                                                                         abs=tolerance)
    assert plateau["end_step"] == 200
    assert "25%" in phases["rule"] and "2%" in phases["rule"]

    verdict = analysis["overfitting"]
    assert verdict["verdict"] == "overfitting" and verdict["from_step"] == BEST_VAL_STEP
    assert f"Overfitting from step {BEST_VAL_STEP}" in verdict["text"]
    assert analysis["checkpoint"]["step"] == 90  # newest of 50, 90, 150, 200 at or before step 100
    assert analysis["checkpoint"]["path"] == str(tmp_path / "run" / "checkpoint-90")
    run = tmp_path / "run"
    command = f"python -m lamelm_fast.export {run}/checkpoint-90 {run}/merged-90"
    assert analysis["checkpoint"]["export_command"] == command
    assert analysis["warnings"] == [{"step": 120, "check": "grad_norm_spike",
                                     "message": "grad norm 12.0 is 10x the running median"}]


def test_mean_final_noise_and_throughput_come_from_the_run(tmp_path: Path) -> None:
    summary = {"steps": 200, "mean_train_loss": 3.25, "runtime_seconds": 125.0, "tokens_per_second": 4200.0,
               "mfu": 0.31, "peak_memory_gb": None}
    analysis = analyse(load_run(write_run(tmp_path / "run", summary=summary)))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["type"] == "train"]
    mean = analysis["mean_vs_final"]
    assert mean["mean_train_loss"] == 3.25 and mean["final_loss"] == losses[-1] and mean["first_loss"] == losses[0]
    assert "early high-loss steps" in mean["text"] and "final loss is the better measure" in mean["text"]
    assert analysis["end_fluctuation"]["is_noise"]  # the tail is flat: only the noise is left
    throughput = analysis["throughput"]
    assert throughput["tokens_per_second"] == 4200.0 and throughput["mfu"] == 0.31
    assert "4,200 tokens/s" in throughput["text"] and "runtime 2 min 5 s" in throughput["text"]
    assert "MFU 31.0%" in throughput["text"]


def test_throughput_says_how_busy_the_gpu_was_and_what_the_input_cost(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    assert "GPU utilisation" not in analyse(load_run(run))["throughput"]["text"]  # not recorded: not claimed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for index, row in enumerate(r for r in rows if r["type"] == "train"):
        row.update(gpu_util=40.0 + 10.0 * (index % 2), input_share=0.5)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    throughput = analyse(load_run(run))["throughput"]
    assert throughput["gpu_util"] == 45.0 and throughput["input_share"] == 0.5
    assert "GPU utilisation 45% on average" in throughput["text"]
    assert "50.0% of the training time spent making batches (the input pipeline held the GPU back)" in (
        throughput["text"])


def test_without_eval_rows_overfitting_cannot_be_judged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", with_eval=False, summary={"steps": 200})
    analysis = analyse(load_run(run_dir))
    assert analysis["overfitting"]["verdict"] == "unknown"
    assert "cannot be judged" in analysis["overfitting"]["text"]
    assert "--eval-split-ratio" in analysis["overfitting"]["text"]
    assert analysis["checkpoint"]["step"] == 200 and "no validation loss" in analysis["checkpoint"]["text"]
    assert not analysis["notes"]
    assert main([str(run_dir)]) == 0
    assert "Overfitting cannot be judged" in capsys.readouterr().out


def test_a_run_that_did_not_finish_is_said_to_have_stopped(tmp_path: Path) -> None:
    """No summary.json (Ctrl-C, SIGTERM, a crash): the report says the run stopped and how to continue it, and does
    not advise holding out data the run may well have held out (its final evaluation never came)."""
    run_dir = write_run(tmp_path / "run", with_eval=False)
    analysis = analyse(load_run(run_dir))
    assert "stopped before any evaluation" in analysis["overfitting"]["text"]
    assert "--eval-split-ratio" not in analysis["overfitting"]["text"]
    assert analysis["notes"] == [
        f"no summary.json: the run did not finish (a signal, an error or a crash stopped it after step 200); this "
        f"covers its logged steps. Its last checkpoint is {run_dir / f'checkpoint-{max(CHECKPOINTS)}'}: the same "
        "command plus --resume-from-checkpoint latest continues it"]


def test_phase_shapes_other_than_a_smooth_exponential() -> None:
    steps = np.arange(1, 101, dtype=float)
    noise = np.random.default_rng(0).normal(0.0, 0.01, 100)
    knee = np.where(steps <= 30, 8.0 - 0.1 * (steps - 1), 5.1) + noise  # straight down, then flat from step 30
    result = find_phases(steps, knee)
    assert [(p["name"], p["start_step"]) for p in result["phases"]] == [("rapid decline", 1), ("plateau", 30)]
    rising = np.where(steps <= 60, 8.0 - 0.05 * steps, 5.0 + 0.02 * (steps - 60)) + noise  # falls, then diverges
    result = find_phases(steps, rising)
    assert [p["name"] for p in result["phases"]] == ["rapid decline", "rising"]
    assert result["phases"][1]["start_step"] == pytest.approx(60, abs=2) and "rose again" in result["text"]
    flat = 3.0 + np.random.default_rng(1).normal(0.0, 0.1, 100)
    assert not find_phases(steps, flat)["found"] and "did not fall clearly" in find_phases(steps, flat)["text"]


def test_too_few_points_for_phases_and_resumed_steps_keep_the_last_row(tmp_path: Path) -> None:
    rows = [{"type": "train", "step": s, "loss": loss, "learning_rate": 1e-3, "epoch": s / 4}
            for s, loss in [(1, 5.0), (2, 4.0), (3, 3.5), (2, 4.2), (3, 3.4), (4, 3.3)]]  # resumed after step 1
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"type": "tra')
    analysis = analyse(load_run(tmp_path))
    assert [m["loss"] for m in analysis["milestones"]] == [5.0, 3.3]  # steps 1 and 4 (end of epoch 1, last step)
    assert analysis["train_points"] == 4 and analysis["mean_vs_final"]["mean_train_loss"] == pytest.approx(3.975)
    assert not analysis["phases"]["found"] and "Too little data" in analysis["phases"]["text"]
    assert any("unreadable line" in note for note in analysis["notes"])  # the line cut short by a crash


def test_end_fluctuation_tells_a_trend_from_noise() -> None:
    rng = random.Random(1)
    noisy = [TrainPoint(step, 2.0 + rng.gauss(0.0, 0.05)) for step in range(1, 41)]
    falling = [TrainPoint(step, 3.0 - 0.02 * step + rng.gauss(0.0, 0.005)) for step in range(1, 41)]
    assert end_fluctuation(noisy)["is_noise"] and "noise" in end_fluctuation(noisy)["text"]
    result = end_fluctuation(falling)
    assert not result["is_noise"] and "still falling" in result["text"]
    assert result["points"] == 6 and result["net_change"] == pytest.approx(-0.1, abs=0.02)


@pytest.mark.parametrize(("val", "train", "verdict", "from_step"), [
    ([3.0, 2.8, 2.7, 2.6], [4.0, 3.5, 3.2, 3.0], "not overfitting", None),
    ([3.0, 2.8, 2.9, 3.1], [4.0, 3.5, 3.2, 3.0], "overfitting", 20),
    ([3.0, 2.8, 3.2, 3.6], [4.0, 3.5, 3.9, 4.4], "val and train rising", 20),
])
def test_overfitting_verdicts(val: list[float], train: list[float], verdict: str, from_step: int | None) -> None:
    steps = [10, 20, 30, 40]
    result = overfitting([TrainPoint(s, loss) for s, loss in zip(steps, train, strict=True)],
                         [EvalPoint(s, v) for s, v in zip(steps, val, strict=True)])
    assert result["verdict"] == verdict and result["from_step"] == from_step


def test_checkpoint_choice_rules() -> None:
    evals = [EvalPoint(50, 3.0), EvalPoint(100, 2.5), EvalPoint(150, 2.7)]
    assert pick_checkpoint(evals, {50: "c50", 100: "c100", 150: "c150"})["step"] == 100
    assert pick_checkpoint(evals, {120: "c120", 150: "c150"})["step"] == 120  # none at or before: nearest after
    assert pick_checkpoint([], {50: "c50", 150: "c150"})["step"] == 150
    assert pick_checkpoint(evals, {})["path"] is None


# ---------------------------------------------------------------------------------------------- output and errors


def test_json_output_holds_the_numbers_of_the_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", summary={"tokens_per_second": 4200.0})
    assert main([str(run_dir), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main([str(run_dir)]) == 0
    markdown = capsys.readouterr().out

    table = [line.split("|")[1:-1] for line in markdown.splitlines()
             if line.startswith("| ") and line.split("|")[2].strip().isdigit()][:len(report["milestones"])]
    assert [int(cells[1]) for cells in table] == [m["step"] for m in report["milestones"]] == [1, 80, 160, 200]
    assert [float(cells[3]) for cells in table] == [round(m["loss"], 4) for m in report["milestones"]]
    for phase in report["phases"]["phases"]:
        assert f"| {phase['name']} | {phase['start_step']}-{phase['end_step']} |" in markdown
    for key in ("overfitting", "checkpoint", "throughput", "mean_vs_final", "end_fluctuation"):
        assert report[key]["text"] in markdown
    assert report["overfitting"]["from_step"] == BEST_VAL_STEP and report["checkpoint"]["step"] == 90


@pytest.mark.parametrize("case", ["missing", "empty dir", "bad json", "not a state", "no rows"])
def test_unreadable_input_is_one_line_and_exit_2(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "input"
    if case == "empty dir":
        path.mkdir()
    elif case == "bad json":
        path = tmp_path / "trainer_state.json"
        path.write_text("{not json")
    elif case == "not a state":
        path = tmp_path / "trainer_state.json"
        path.write_text(json.dumps({"global_step": 3}))
    elif case == "no rows":
        path.mkdir()
        (path / "metrics.jsonl").write_text("\n")
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and str(path) in captured.err and "expected" in captured.err


def test_module_entry_point_exits_2_on_a_bad_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    result = subprocess.run([sys.executable, "-m", "lamelm_fast.explain", str(missing)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and str(missing) in result.stderr


def test_samples_show_what_the_model_said_first_and_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as metrics:
        for step, said in ((20, "x x x"), (100, "def add(a, b):"), (200, "def add(a, b):\n    return a + b")):
            metrics.write(json.dumps({"type": "sample", "step": step, "index": 0, "prompt": "Add two numbers.",
                                      "completion": said, "reference": "def add(a, b): return a + b"}) + "\n")
    analysis = analyse(load_run(run))
    assert analysis["samples"]["prompts"] == [{"prompt": "Add two numbers.", "reference": "def add(a, b): return a + b",
                                               "first_step": 20, "first": "x x x", "last_step": 200,
                                               "last": "def add(a, b):\n    return a + b"}]
    assert analysis["train_points"] == 200  # sample rows are not train rows
    assert main([str(run)]) == 0
    text = capsys.readouterr().out
    assert "## What the model says" in text and "  - step 200: 'def add(a, b):\\n    return a + b'" in text
    assert "No samples were logged" in analyse(load_run(write_run(tmp_path / "plain")))["samples"]["text"]


# (logged train steps, the last segment's first step, where the logs start if rows of earlier segments are missing)
RESUMED_LOGS = {
    # An old checkpoint (no logged rows) resumed in dir B at step 2, B's checkpoint-4 resumed in dir C: C's logs hold
    # B's rows and its own, steps 3-8.
    "two hops from a checkpoint without rows": (range(3, 9), 5, 3),
    "one hop from a checkpoint without rows": (range(5, 9), 5, 5),
    "every row, resumed twice": (range(1, 9), 5, None),
    "every row, logged every 10 steps, resumed before the first": ([10, 20, 30], 5, None),
    "logged every 10 steps, two hops": (range(30, 90, 10), 65, 30),
    "one row before the last": ([7, 8], 7, 7),
}


@pytest.mark.parametrize("case", RESUMED_LOGS)
def test_a_resumed_runs_logs_say_whether_they_start_at_the_runs_first_logging_step(tmp_path: Path, case: str) -> None:
    steps, first, missing_from = RESUMED_LOGS[case]
    steps = list(steps)
    rows = [{"type": "train", "step": step, "loss": 3.0 - step / 100, "learning_rate": 1e-3, "epoch": step / 100}
            for step in steps]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"steps": steps[-1], "segments": 3, "segment_first_step": first, "tokens": None, "first_loss": 2.99,
               "mean_train_loss": 2.9, "warnings": 0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = analyse(load_run(tmp_path))["segments"]
    assert result["segments"] == 3 and f"resumed last at step {first - 1}" in result["text"]
    assert result["logs_from_step"] == steps[0]
    if missing_from is None:
        assert "logs start" not in result["text"]
    else:
        assert f"This directory's logs start at step {missing_from}:" in result["text"]
        assert f"cover steps {missing_from}-{steps[-1]} only" in result["text"]


def test_short_runtimes_and_single_counts_read_naturally() -> None:
    """A test-sized run's runtime is not "0 s", and one evaluation is not "1 evaluations"."""
    from lamelm_fast.explain import _count, _duration

    assert [_duration(s) for s in (0.04, 3.21, 75, 3700)] == ["0.04 s", "3.2 s", "1 min 15 s", "1 h 1 min 40 s"]
    assert [_count(n, "evaluation") for n in (0, 1, 2)] == ["0 evaluations", "1 evaluation", "2 evaluations"]


def test_a_lamelm_checkpoint_describes_the_run_up_to_it(tmp_path: Path) -> None:
    """A checkpoint carries the rows logged up to its step (metrics.jsonl.gz): explain reads them as it reads an HF
    checkpoint's trainer_state.json, with the checkpoints beside it up to its step."""
    import gzip

    run_dir = write_run(tmp_path / "run", summary={"steps": 200})
    step = sorted(CHECKPOINTS)[1]
    rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (run_dir / f"checkpoint-{step}" / "metrics.jsonl.gz").write_bytes(gzip.compress("\n".join(rows).encode()))
    analysis = analyse(load_run(run_dir / f"checkpoint-{step}"))
    assert analysis["last_step"] == step and analysis["checkpoints"] == [s for s in sorted(CHECKPOINTS) if s <= step]
    assert analysis["notes"] == [f"a checkpoint: the rows logged up to its step {step}, and the checkpoints beside "
                                 "it up to it"]
