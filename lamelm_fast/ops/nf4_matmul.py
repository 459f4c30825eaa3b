"""How the Triton backend multiplies by a 4-bit weight: one fused kernel, or dequantize then cuBLAS, per shape.

``fused`` (:func:`lamelm_fast.kernels.nf4_lora.matmul_4bit_lora`): one Triton GEMM dequantizes W tiles in
registers and adds the LoRA term in its epilogue; no bf16 weight ever exists. ``dequant``
(:func:`~lamelm_fast.kernels.nf4_lora.dequant_matmul_4bit_lora`): W dequantized into a buffer for the duration of
the call, one cuBLAS GEMM that carries the LoRA term too. The fused kernel reads a quarter of the weight bytes and
no buffer, so it wins while the weight traffic matters (few rows); cuBLAS should win where the in-register
dequantization cannot hide behind the tensor cores (many rows). Where the crossover lies is measured, not assumed:

``auto`` (the default; ``LAMELM_NF4_MATMUL``, see :mod:`lamelm_fast.ops.dispatch`): from
:data:`DEQUANT_FROM_ROWS` rows on, ``dequant`` without a trial (measured on an H100, bench/results 2026-11-23: dequant
won every shape and direction there, by 1.2x to 14x, and a trial would compile the fused kernel's autotuning
configurations for nothing at the first training step). Below it, on a GPU, the first call of each
:class:`ShapeKey` (rows bucketed to a power of two, as Triton's autotuner buckets them) times both strategies with
CUDA events, on scratch outputs, and keeps the faster for the rest of the process; decoding's few rows take the
fused strategy's GEMV untimed (:func:`settled_strategy`). No timing under Triton's
interpreter, off CUDA, during CUDA-graph capture or while torch.compile traces: there ``auto`` is ``fused`` (or a
decision already made). ``auto`` decides on timings, so two runs may round differently where the two strategies
are close; pin ``fused`` or ``dequant`` for bitwise-reproducible runs.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lamelm_fast.kernels import nf4_lora
from lamelm_fast.ops.dispatch import triton_interpreted

__all__ = ["DEQUANT_FROM_ROWS", "STRATEGIES", "ShapeKey", "StrategyCache", "faster", "m_bucket", "matmul_4bit_lora",
           "settled_strategy", "shape_key", "time_strategies"]

logger = logging.getLogger(__name__)

STRATEGIES = ("fused", "dequant")
# dequant must beat fused by this fraction: its weight buffer (2 bytes per weight, plus a result buffer when the
# output dtype differs) costs memory, and a near-tie in timing is noise.
DEQUANT_MARGIN = 0.03
# From this many rows on, auto takes dequant untimed (see the module's docstring): the training shapes (thousands of
# tokens per step) never build the fused kernel; decoding, evaluation and small batches still measure.
DEQUANT_FROM_ROWS = 2048
WARMUP, REPEATS = 1, 5  # per strategy, interleaved; the warm-up also runs Triton's own autotuning


@dataclass(frozen=True)
class ShapeKey:
    """What the two strategies' relative speed depends on."""

    m_bucket: int  # rows rounded up to a power of two
    p: int  # output columns
    q: int  # reduction length
    weight_transposed: bool  # True: forward (a @ W^T); False: input gradient (a @ W)
    in_dtype: torch.dtype  # a's; a cast to the compute dtype is free for the dequant path's concatenated operand
    dtype: torch.dtype  # compute
    out_dtype: torch.dtype
    accumulate: bool
    lora: bool
    blocksize: int
    nested: bool
    device: int | None


def m_bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two, as Triton's autotuner keys the fused kernel: few shapes to measure."""
    return 1 << max(rows - 1, 0).bit_length()


def shape_key(a: torch.Tensor, w: Any, *, dtype: torch.dtype, weight_transposed: bool, out: torch.Tensor | None,
              accumulate: bool, lora: bool) -> ShapeKey:
    return ShapeKey(m_bucket(a.shape[0]), w.shape[0] if weight_transposed else w.shape[1], a.shape[1],
                    weight_transposed, a.dtype, dtype, dtype if out is None else out.dtype, accumulate, lora,
                    w.blocksize, w.nested, a.device.index)


def faster(timings: Mapping[str, float]) -> str:
    """The strategy to keep, from median milliseconds per strategy: ``fused`` unless ``dequant`` is faster by more
    than :data:`DEQUANT_MARGIN` (a strategy that could not run has ``inf``)."""
    fused, dequant = timings["fused"], timings["dequant"]
    return "dequant" if dequant < fused * (1.0 - DEQUANT_MARGIN) else "fused"


class StrategyCache:
    """Decisions per :class:`ShapeKey`; a shape is measured once, the first time it is seen."""

    def __init__(self) -> None:
        self._choices: dict[ShapeKey, str] = {}

    def __len__(self) -> int:
        return len(self._choices)

    def get(self, key: ShapeKey) -> str | None:
        return self._choices.get(key)

    def clear(self) -> None:
        self._choices.clear()

    def items(self) -> list[tuple[ShapeKey, str]]:
        return list(self._choices.items())

    def choose(self, key: ShapeKey, measure: Callable[[], Mapping[str, float]]) -> str:
        """The cached decision for ``key``, else ``faster(measure())``, cached and logged."""
        choice = self._choices.get(key)
        if choice is None:
            timings = measure()
            choice = self._choices[key] = faster(timings)
            logger.debug("4-bit matmul %s: %s -> %s", key,
                         ", ".join(f"{name} {ms:.3f} ms" for name, ms in timings.items()), choice)
        return choice


CACHE = StrategyCache()


def _launch(name: str, a: torch.Tensor, w: Any, dtype: torch.dtype, args: dict[str, Any],
            out: torch.Tensor | None, accumulate: bool, a_casts: Any = None) -> torch.Tensor:
    # The launch functions are looked up at call time, so a module attribute replaced in tests is what runs.
    if name == "fused":
        return nf4_lora.matmul_4bit_lora((a if a_casts is None else a_casts).to(dtype), w, **args, out=out,
                                         accumulate=accumulate)
    return nf4_lora.dequant_matmul_4bit_lora(a, w, dtype=dtype, **args, out=out, accumulate=accumulate)


def time_strategies(run: Callable[[str], object], *, warmup: int = WARMUP,
                    repeats: int = REPEATS) -> dict[str, float]:
    """Median CUDA-event milliseconds of ``run(name)`` per strategy, after ``warmup`` untimed runs each. Strategies
    are interleaved so that clock and cache drift hit both alike; one that runs out of memory gets ``inf``."""
    runnable = []
    for name in STRATEGIES:
        try:
            for _ in range(warmup):
                run(name)
            runnable.append(name)
        except torch.OutOfMemoryError:
            pass
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in runnable}
    for _ in range(repeats):
        for name in runnable:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(name)
            end.record()
            events[name].append((start, end))
    timings = dict.fromkeys(STRATEGIES, math.inf)
    for name, pairs in events.items():
        pairs[-1][1].synchronize()  # one stream: the last event done means every event before it is done
        timings[name] = statistics.median(start.elapsed_time(end) for start, end in pairs)
    return timings


def _can_time(a: torch.Tensor) -> bool:
    return (a.device.type == "cuda" and not triton_interpreted() and not torch.cuda.is_current_stream_capturing()
            and not torch.compiler.is_compiling())


def settled_strategy(strategy: str, rows: int) -> str:
    """``strategy``, with ``auto`` settled where it takes no trial: ``dequant`` from :data:`DEQUANT_FROM_ROWS` rows
    on, ``fused`` (its GEMV kernel) up to ``GEMV_MAX_ROWS`` rows (decoding). The GEMV reads the 4-bit weight once,
    a fifth of the bytes dequant moves, and needs no bf16 weight buffer; a trial there would time host overhead (the
    first GPU session's decode rows: every strategy ~0.1-0.7 ms for microseconds of work) and could keep a
    dequantized copy of the weight per call on noise."""
    if strategy != "auto":
        return strategy
    if rows >= DEQUANT_FROM_ROWS:
        return "dequant"
    return "fused" if rows <= nf4_lora.GEMV_MAX_ROWS else strategy


def matmul_4bit_lora(a: torch.Tensor, w: Any, *, strategy: str, dtype: torch.dtype | None = None,
                     weight_transposed: bool = True, lora: tuple[torch.Tensor, torch.Tensor] | None = None,
                     scale: float = 1.0, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     accumulate: bool = False, a_casts: Any = None) -> torch.Tensor:
    """``out (+)= a @ op(W) + scale * left @ right + bias`` (see :func:`lamelm_fast.kernels.nf4_lora.
    matmul_4bit_lora`) in the compute ``dtype`` (default a's; a is cast to it), with ``strategy`` ``fused``,
    ``dequant`` or ``auto``. ``a_casts``: the caller's cache of a's casts (``.to(dtype)`` makes one once, so
    projections sharing an input share it); the fused strategy asks it for its operand, the dequant one writes its
    own cast into its GEMM operand and asks for none."""
    dtype = a.dtype if dtype is None else dtype
    args = {"weight_transposed": weight_transposed, "lora": lora, "scale": scale, "bias": bias}
    strategy = settled_strategy(strategy, a.shape[0])
    if strategy == "auto":
        key = shape_key(a, w, dtype=dtype, weight_transposed=weight_transposed, out=out, accumulate=accumulate,
                        lora=lora is not None)
        if _can_time(a):
            def measure() -> dict[str, float]:
                # Trials write a scratch output: the caller's out (an autograd buffer, maybe holding a sum to add
                # to) is written once, below, by the chosen strategy. Accumulating trials add onto zeros.
                scratch = None if out is None else torch.zeros_like(out)
                with torch.cuda.device(a.device):
                    return time_strategies(lambda name: _launch(name, a, w, dtype, args, scratch, accumulate,
                                                                a_casts))

            strategy = CACHE.choose(key, measure)
        else:
            strategy = CACHE.get(key) or "fused"
    return _launch(strategy, a, w, dtype, args, out, accumulate, a_casts)
