"""Host work of one QLoRA training step, ours against the HF Trainer's, counted on a CPU without a GPU.

On the H100 both trainers' QLoRA steps took ~1.6-2x the time their GPU work predicts (NOTES-end-to-end.md): a step
that launches a few thousand small ops is paced by the host's Python and dispatch time, not by the GPU. That host work
does not need a GPU to be counted. This runs both trainers on the recipe of ``bench/test_end_to_end.py`` with
Llama-3.2-1B's depth (16 decoder layers, 7 projections each, gradient checkpointing) at tiny widths on CPU, and counts
per training step:

* ``aten_ops``: ATen ops dispatched (a ``TorchDispatchMode``), views and allocations included, and of them those
  that launch a kernel on a GPU (neither a view by their schema nor an allocation);
* ``triton_launches``: our Triton kernel launches. They run under ``TRITON_INTERPRET=1`` with the kernel bodies
  skipped, so the launch functions and everything around them run as on a GPU while no kernel computes: our
  trainer's losses are garbage here (its divergence check is switched off), and only the counts mean anything.

Per-step counts are the difference between a run of 2 x ``--steps`` and one of ``--steps``, divided by ``--steps``:
setup and the first step's one-off work cancel. Ours runs the Triton backend with ``LAMELM_NF4_MATMUL=dequant``
(what ``auto`` picks at the GPU's 8192 tokens per step) in its GPU dtypes (bf16 autocast and 4-bit compute). HF runs
bitsandbytes' CPU kernels in fp32, which differ from its GPU path in a few ops per projection.

``--sources N``: the N commonest (op, call site) pairs of our step, the call site being the innermost frame in
lamelm_fast (or the first one outside torch): where to cut next. ``--time``: also the wall milliseconds per step
(median of the logged windows after the first, as the bench takes tokens/s; ours without its kernels' compute),
noisy on a shared 2-core machine: compare runs taken back to back. ``--policy keep_attention``: our trainer under
that checkpointing policy.

    PYTHONSAFEPATH=1 .venv/bin/python bench/step_host_work.py [--layers 16] [--steps 10] [--sources 30] [--time]
        [--policy full|keep_attention]
"""

from __future__ import annotations

import os

# Before triton is imported: the interpreter's launch path is the one that can run without a GPU.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["LAMELM_KERNELS"] = "triton"
os.environ["LAMELM_NF4_MATMUL"] = "dequant"

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/'s modules, as pytest puts them on the path
import test_end_to_end as e2e  # noqa: E402

from lamelm_fast.train import loop, model, reporting  # noqa: E402

SEQ_LEN = 16  # tokens per row: 4 x 16 per step, so what is left of the CPU's own compute is small next to dispatch
LAUNCHES: collections.Counter[str] = collections.Counter()


def _skip_kernel(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
    LAUNCHES[self.fn.__name__] += 1


# Ops that allocate or make metadata only (no kernel on a GPU) beyond the views, which their schemas give away.
_NO_KERNEL = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.promote_types",
              "aten.lift_fresh", "aten._unsafe_view"}


def _launches_a_kernel(func: Any) -> bool:
    """Whether ``func`` runs a kernel on a GPU: not a view (an aliased return, no mutation), not an allocation."""
    schema = func._schema
    is_view = not schema.is_mutable and any(ret.alias_info is not None for ret in schema.returns)
    return not is_view and str(func.overloadpacket) not in _NO_KERNEL


class _CountOps(TorchDispatchMode):
    def __init__(self, sources: bool = False) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launching = 0  # of the ops, those that launch a kernel on a GPU
        self.sources: collections.Counter[tuple[str, str]] | None = collections.Counter() if sources else None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        self.ops[name] += 1
        self.launching += _launches_a_kernel(func)
        if self.sources is not None:
            self.sources[name, _call_site()] += 1
        return func(*args, **(kwargs or {}))


def _call_site() -> str:
    """The innermost frame in lamelm_fast, else the innermost outside torch and this file."""
    frames = traceback.extract_stack()[:-3]
    ours = [f for f in frames if "/lamelm_fast/" in f.filename or "/kernels/" in f.filename]
    frame = (ours or [f for f in frames if "/torch/" not in f.filename and __file__ not in f.filename] or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def _keep_going(log_train: Any) -> Any:
    def log_train_without_stopping(self: Any, *args: Any, **kwargs: Any) -> None:
        log_train(self, *args, **kwargs)  # logged as usual; a NaN loss of the skipped kernels does not stop the run

    return log_train_without_stopping


def _as_on_a_gpu() -> None:
    """Our QLoRA in its GPU dtypes (on CPU the trainer computes in fp32): bf16 4-bit compute under bf16 autocast over
    fp32 activations, so the ops run the casts and the paths they take on a GPU."""
    quantized_load_kwargs, load_model = model.quantized_load_kwargs, loop.load_model

    def bf16_compute(device: torch.device) -> dict[str, Any]:
        kwargs = quantized_load_kwargs(device)
        kwargs["quantization_config"].bnb_4bit_compute_dtype = torch.bfloat16
        return kwargs

    def under_autocast(*args: Any, **kwargs: Any) -> model.LoadedModel:
        loaded = load_model(*args, **kwargs)
        loaded.autocast_dtype = torch.bfloat16
        return loaded

    model.quantized_load_kwargs, loop.load_model = bf16_compute, under_autocast


def _model(layers: int, folder: Path, tokenizer: Any) -> Path:
    from transformers import AutoModelForCausalLM

    config = e2e.model_config("qlora")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, 64, 256
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(e2e.SEED)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (Llama-3.2-1B: 16)")
    parser.add_argument("--steps", type=int, default=10, help="steps of the short run (the long one: twice as many)")
    parser.add_argument("--sources", type=int, default=0, metavar="N",
                        help="also print our step's N commonest (op, call site) pairs")
    parser.add_argument("--time", action="store_true", help="also print wall milliseconds per step")
    parser.add_argument("--trainers", nargs="+", default=["lamelm", "hf"], choices=["lamelm", "hf"])
    parser.add_argument("--policy", default="full", choices=["full", "keep_attention"],
                        help="our trainer's gradient_checkpointing_policy")
    args = parser.parse_args(argv)

    interpreter.InterpretedFunction.run = _skip_kernel
    reporting.TrainingReport.log_train = _keep_going(reporting.TrainingReport.log_train)
    _as_on_a_gpu()
    from lamelm_fast.train.config import TrainConfig
    from lamelm_fast.train.model import load_tokenizer

    tokenizer = load_tokenizer(TrainConfig())
    work = Path(tempfile.mkdtemp(prefix="step-host-work-"))
    path = _model(args.layers, work / "model", tokenizer)
    docs = e2e.documents(tokenizer, 2 * args.steps * e2e.BATCH, SEQ_LEN)
    data = e2e.write_documents(docs, work / "docs.jsonl")

    def run(trainer: str, steps: int, out: Path) -> dict[str, Any]:
        if trainer == "lamelm":
            return e2e.run_ours(path, data, out, "qlora", seq_len=SEQ_LEN, steps=steps,
                                gradient_checkpointing_policy=args.policy)
        return e2e.run_hf(path, docs, tokenizer, out, "qlora", seq_len=SEQ_LEN, steps=steps)

    lines = [f"per training step, QLoRA, {args.layers} layers, batch {e2e.BATCH} x {SEQ_LEN} tokens, CPU"]
    for trainer in args.trainers:
        counts = []
        for steps in (args.steps, 2 * args.steps):
            LAUNCHES.clear()
            with _CountOps(sources=bool(args.sources) and trainer == "lamelm") as mode:
                run(trainer, steps, work / f"{trainer}-{steps}")
            counts.append((mode, sum(LAUNCHES.values())))
        (short, launches_short), (long, launches_long) = counts
        line = (f"{trainer:>7}: {(sum(long.ops.values()) - sum(short.ops.values())) / args.steps:8.1f} aten ops "
                f"({(long.launching - short.launching) / args.steps:.1f} launch a kernel on a GPU), "
                f"{(launches_long - launches_short) / args.steps:6.1f} Triton launches")
        if args.time:  # a run without the dispatch mode: its own overhead would dominate the timing
            timed = run(trainer, 2 * args.steps, work / f"{trainer}-timed")
            line += f", {e2e.BATCH * SEQ_LEN / timed['tokens_per_second'] * 1e3:6.1f} ms (windows' median)"
        lines.append(line)
        if short.sources is not None:
            per_step = {key: (long.sources[key] - short.sources[key]) / args.steps for key in long.sources}
            for (op, site), count in sorted(per_step.items(), key=lambda item: -item[1])[:args.sources]:
                lines.append(f"    {count:7.1f}  {op:32} {site}")
    print("\n".join(lines))  # after the trainers' own logs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
