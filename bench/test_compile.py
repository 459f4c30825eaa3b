"""torch.compile over a training step, with and without apply_kernels: forward + backward of a full fine-tune (every
weight trained; the optimizer is not in the step) of the Llama-3.2-1B architecture, four variants in the same run:
HF eager, HF + torch.compile, apply_kernels eager, apply_kernels + torch.compile.

GPU: random bf16 weights (speed does not depend on them, and the hub is unreachable), batch 4 x 2048 tokens, sdpa
attention, no checkpointing, inductor. CPU: a 2-layer cut of the embedded model in fp32 with ``aot_eager`` (no C++
build), so the suite never rots; its numbers are not claims. apply_kernels without its varlen attention wrapper: the
rows are not packed, and the wrapper is process-wide (the HF model's attention would run through it too).

Two rows: ``case=eager`` (apply_kernels' step against HF's) and ``case=compile`` (both compiled), each with the
floor: the step's model FLOPs (the trainer's MFU formula, lamelm_fast.metrics.throughput) at the device's measured
matmul rate, and each step's share of it (``*_fraction``). The compiled row adds compile's gain on each model
(``speedup_compile_*``: eager time / compiled time), the steps a run needs before compiling has paid for itself
(``*_break_even_steps``) and ours compiled against HF eager (``time_vs_hf_eager``).
``*_first_step_s``: the wall time of each variant's first step, where torch.compile compiles (with cold caches on a
fresh machine; inductor's on-disk caches shorten a second run there); the timed steps follow it and a warm-up.
Predictions: bench/NOTES-compile.md.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

import harness
import pytest
import torch
from test_end_to_end import model_config, reset_memory
from transformers import AutoModelForCausalLM

from lamelm_fast import apply_kernels
from lamelm_fast.metrics.throughput import count_parameters, flops_per_token

ON_GPU = torch.cuda.is_available()
BATCH, SEQ_LEN = (4, 2048) if ON_GPU else (2, 64)
BACKEND = "inductor" if ON_GPU else "aot_eager"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
WARMUP, REPEATS = (3, 12) if ON_GPU else (1, 3)
SEED = 7


class TimedFirstCall:
    """A training step whose first call (where torch.compile compiles: measure()'s first warm-up call) is timed on
    the wall clock and its loss kept (its host read waits for the step's kernels); later calls are the step itself."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        self.step = step
        self.first_s: float | None = None
        self.first_loss: float | None = None

    def __call__(self) -> torch.Tensor:
        if self.first_s is not None:
            return self.step()
        began = time.perf_counter()
        loss = self.step()
        self.first_loss = loss.item()
        self.first_s = time.perf_counter() - began
        return loss


def training_step(call: Callable[..., Any], ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    return step


def prepared(model: torch.nn.Module, case: str) -> Callable[..., Any]:
    """The model itself, or compiled (one shape throughout: no dynamic-shape recompile)."""
    return torch.compile(model, backend=BACKEND, dynamic=False) if case == "compile" else model


@pytest.fixture
def models(device: torch.device) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    """(HF's model, a copy with the same weights patched by apply_kernels), trainable, on the device; afterwards the
    compiled graphs and the models are released (the next suites measure their peaks above what is left)."""
    config = model_config("full")
    if not ON_GPU:
        config.num_hidden_layers = 2  # two aot_eager compiles of the embedded model's 4 layers: ~2x the CPU seconds
    torch.manual_seed(SEED)
    with torch.device(device):
        # (made on the device: 1.2B weights drawn on the host take a GPU call's seconds; .to() moves anything made
        # on the host regardless)
        hf = AutoModelForCausalLM.from_config(config, dtype=DTYPE, attn_implementation="sdpa").to(device).train()
    ours = copy.deepcopy(hf)
    apply_kernels(ours, varlen_attention=False)
    yield hf, ours
    del hf, ours
    torch._dynamo.reset()
    reset_memory()


def test_compile(benchmark, device: torch.device, peaks: dict[str, float],
                 models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    hf, ours = models
    ids = torch.randint(1, hf.config.vocab_size, (BATCH, SEQ_LEN), device=device,
                        generator=torch.Generator(device=device).manual_seed(SEED))
    flops = flops_per_token(hf.config, *count_parameters(hf), SEQ_LEN) * BATCH * SEQ_LEN
    floor_ms = flops / peaks["matmul_flops"] * 1e3

    def zero_grads() -> None:  # every step allocates its gradients, as a loop with zero_grad(set_to_none=True) does
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)

    steps: dict[str, dict[str, TimedFirstCall]] = {}
    eager: dict[str, Any] = {}
    for case in ("eager", "compile"):
        steps[case] = {name: TimedFirstCall(training_step(prepared(model, case), ids))
                       for name, model in (("lamelm", ours), ("hf", hf))}
        row: dict[str, Any] = {"case": case, "variant": "full", "dtype": str(DTYPE).removeprefix("torch."),
                               "batch": BATCH, "seq_len": SEQ_LEN, "backend": BACKEND if case == "compile" else "-"}
        harness.measure_against(row, steps[case], device, floor=("flops_floor", floor_ms), warmup=WARMUP,
                                repeats=REPEATS, setup=zero_grads)
        if isinstance(row.get("hf_ms"), float):
            row["hf_flops_floor_fraction"] = floor_ms / row["hf_ms"]
        for name, step in steps[case].items():
            row[f"{name}_first_step_s"] = step.first_s
        if case == "compile":  # compile's gain on each model, measured in this run
            for name in ("lamelm", "hf"):
                if isinstance(row.get(f"{name}_ms"), float) and isinstance(eager.get(f"{name}_ms"), float):
                    row[f"speedup_compile_{name}"] = eager[f"{name}_ms"] / row[f"{name}_ms"]
                    # The steps after which compiling has paid for itself: its first step's extra seconds over the
                    # seconds it saves per step.
                    saved_s = (eager[f"{name}_ms"] - row[f"{name}_ms"]) / 1e3
                    extra_s = row[f"{name}_first_step_s"] - eager[f"{name}_first_step_s"]
                    row[f"{name}_break_even_steps"] = extra_s / saved_s if saved_s > 0 else "never"
            if isinstance(row.get("lamelm_ms"), float) and isinstance(eager.get("hf_ms"), float):
                row["time_vs_hf_eager"] = row["lamelm_ms"] / eager["hf_ms"]
        else:
            eager = row
        harness.record("compile", row)  # each row as it is measured: a run cut short keeps the eager one
        benchmark.extra_info.update({f"{case}_{key}": value for key, value in row.items()})

    # The steps that ran compute the same loss (the same weights and tokens; no optimizer step between them), or the
    # faster one is not faster.
    losses = {f"{name} {case}": step.first_loss for case in steps for name, step in steps[case].items()
              if step.first_loss is not None}
    assert max(losses.values()) - min(losses.values()) < 1e-2 * min(losses.values()), losses
    benchmark.pedantic(harness.synchronized(steps["compile"]["lamelm"], device), setup=zero_grads, rounds=3,
                       iterations=1)
