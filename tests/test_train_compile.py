"""``--compile``: the trainer compiles each decoder layer in place, and a compiled run trains as the eager one does.

The runs compile with ``aot_eager`` (dynamo's graphs and AOT autograd's forward/backward split, no C++ build), set
through ``lamelm_fast.train.model.COMPILE_BACKEND``, so that the file stays well under a minute on 2 cores;
tests/test_torch_compile.py compiles the patched model with inductor itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from conftest import embedded_records, rel_err, write_jsonl
from lamelm_fast.train import TrainConfig, train
from lamelm_fast.train import model as model_module
from lamelm_fast.train.cli import parse_config
from lamelm_fast.train.config import ConfigError
from lamelm_fast.train.reporting import CompileClock


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(model_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_is_one_setting_of_the_cli_yaml_and_python(tmp_path: Path) -> None:
    assert TrainConfig().compile is False
    assert parse_config(["--compile"]).compile is True
    path = tmp_path / "run.yaml"
    path.write_text("compile: true\n", encoding="utf-8")
    assert parse_config(["--config", str(path)]).compile is True
    assert parse_config(["--config", str(path), "--no-compile"]).compile is False
    with pytest.raises(ConfigError, match="compile: expected true or false"):
        parse_config(["--compile", "maybe"])


def test_the_compile_clock_counts_compiling_only() -> None:
    """What tokens/s leaves out: seconds inside torch.compile, not the compiled function's calls."""
    torch._dynamo.reset()
    clock = CompileClock()
    try:
        compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="aot_eager")
        compiled(torch.randn(4, requires_grad=True)).sum().backward()
        assert clock.take() > 0
        compiled(torch.randn(4, requires_grad=True)).sum().backward()  # the same graph: nothing compiled
        assert clock.take() == 0
        assert clock.total > 0  # (what the summary reports)
    finally:
        clock.close()
        torch._dynamo.reset()
    assert clock._start not in torch._dynamo.callback_handler.start_callbacks


def _run(tmp_path: Path, name: str, model_dir: Path, dataset: Path, **settings: Any) -> tuple[list[dict], Path]:
    values = dict(model=str(model_dir), dataset=str(dataset), output_dir=str(tmp_path / name), quiet=True,
                  learning_rate=5e-3, max_seq_length=128, per_device_train_batch_size=4, logging_steps=1,
                  eval_split_ratio=0.2, eval_steps=2, max_steps=4, seed=5)
    config = TrainConfig(**{**values, **settings})
    result = train(config)
    return [row for row in result.history if row["type"] in ("train", "eval")], result.checkpoint


def _assert_same_run(compiled: tuple[list[dict], Path], eager: tuple[list[dict], Path], weights_file: str) -> None:
    (rows, checkpoint), (want_rows, want_checkpoint) = compiled, eager
    assert [(row["type"], row["step"]) for row in rows] == [(row["type"], row["step"]) for row in want_rows]
    for row, want in zip(rows, want_rows, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in want:
                assert row[key] == pytest.approx(want[key], rel=1e-5), (key, row["step"])
    weights, want_weights = load_file(str(checkpoint / weights_file)), load_file(str(want_checkpoint / weights_file))
    assert weights.keys() == want_weights.keys()  # no _orig_mod. prefixes: checkpoints are the eager run's
    for name, weight in weights.items():
        assert rel_err(weight, want_weights[name]) < 1e-5, name


def _graphs() -> int:
    """The graphs dynamo compiled since the counters were cleared; it broke none."""
    assert not counters["graph_break"], dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_full_fine_tuning_compiled_trains_as_eager(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                   aot_eager: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Packed rows of new lengths at every step, checkpointed layers keeping their attention outputs, evaluations
    between steps: the losses, validation losses and final weights of the eager run, from one graph for training and
    one for evaluation, shared by both layers (no recompile per step or per layer)."""
    settings = dict(finetune="full", gradient_checkpointing=True, gradient_checkpointing_policy="keep_attention")
    eager = _run(tmp_path, "eager", tiny_model_dir, small_alpaca, **settings)
    counters.clear()
    compiled = _run(tmp_path, "compiled", tiny_model_dir, small_alpaca, compile=True, quiet=False, **settings)
    # Training, evaluation (no grad), and with checkpointing one more evaluation variant (a requires_grad guard on the
    # layer's input): none per step, shape or layer.
    assert _graphs() <= 3
    assert "note: torch.compile (aot_eager) of the 2 decoder layers" in capsys.readouterr().out
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("eager", "compiled")]
    assert "segment_compile_seconds" not in summaries[0] and summaries[1]["segment_compile_seconds"] > 0
    _assert_same_run(compiled, eager, "model.safetensors")


@pytest.mark.slow
def test_qlora_compiled_trains_as_eager(tmp_path: Path, tiny_model_dir: Path, aot_eager: None) -> None:
    """QLoRA (the 4-bit LoRA custom ops) with LoRA dropout and gradient checkpointing, whose recompute replays the
    dropout masks: the eager run's losses and adapter."""
    pytest.importorskip("bitsandbytes")
    dataset = write_jsonl(tmp_path / "d.jsonl", embedded_records(24))
    settings = dict(finetune="qlora", lora_dropout=0.1, gradient_checkpointing=True)
    eager = _run(tmp_path, "eager", tiny_model_dir, dataset, **settings)
    counters.clear()
    compiled = _run(tmp_path, "compiled", tiny_model_dir, dataset, compile=True, **settings)
    assert _graphs() <= 3
    _assert_same_run(compiled, eager, "adapter_model.safetensors")


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_before_training(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    # (config.patch, not monkeypatch: after monkeypatch's undo, torch 2.11's inductor could not read its config)
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), \
            pytest.raises(ConfigError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        _run(tmp_path, "run", tiny_model_dir, small_alpaca, finetune="full", compile=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
