"""Host (Python) time of one FusedAdamW step's bookkeeping on the Triton backend, without running any kernel.

The LoRA case is host-bound on a GPU (~0.12 ms of device work for 448 tensors), so what the step spends in Python
before its launches matters. This times ``FusedAdamW._collect()`` plus the Triton backend's table refresh in the
steady state (same params, new gradient tensors every step as after ``zero_grad(set_to_none=True)``), next to
torch's own per-step bookkeeping (``AdamW._init_group``, foreach path), on CPU tensors. Gradients come three ways:

* ``autograd``: from a backward pass, as in training: new tensors at new addresses, whose Python objects are
  created when ``p.grad`` is first read (every optimizer pays that);
* ``new``: allocated from Python at new addresses (what CPU training sees);
* ``same``: new tensor objects over the same memory (what the CUDA caching allocator usually hands out from one
  step to the next: no table upload then).

    PYTHONSAFEPATH=1 .venv/bin/python bench/adamw_host_time.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lamelm_fast.optim import FusedAdamW
from lamelm_fast.optim._adamw_triton import TritonAdamW
from lamelm_fast.optim._adamw_work import StepTensors


def lora_params(layers: int = 32, rank: int = 16) -> list[nn.Parameter]:
    """Rank-``rank`` adapters (A [r, k], B [n, r]) on the 7 projections of ``layers`` Llama-like layers."""
    hidden, intermediate = 512, 1376  # small on purpose: host time does not depend on the sizes
    shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]  # q k v o gate up down
    params = []
    for _ in range(layers):
        for n, k in shapes:
            params += [nn.Parameter(torch.zeros(rank, k)), nn.Parameter(torch.zeros(n, rank))]
    return params


def grad_maker(params: list[nn.Parameter], mode: str) -> Callable[[], None]:
    """A function that gives every param a new gradient tensor, the ``mode`` way (see the module docstring)."""
    if mode == "autograd":
        def backward() -> None:
            for p in params:
                p.grad = None
            torch.stack([p.sum() for p in params]).sum().backward()

        return backward
    if mode == "new":
        def allocate() -> None:
            for p in params:
                p.grad = torch.zeros_like(p)

        return allocate
    stable = [torch.zeros_like(p) for p in params]

    def views() -> None:
        for p, buffer in zip(params, stable, strict=True):
            p.grad = buffer.view(p.shape)

    return views


def median_us(fns: dict[str, Callable[[], object]], new_grads: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median time of each function, interleaved so that load from other processes hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            new_grads()  # not timed
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if isinstance(result, StepTensors):
                # What step() does after its launches, so that the next step does not free these gradients.
                result.grads = []
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    params = lora_params()
    grad_maker(params, "new")()

    opt = FusedAdamW(params, lr=1e-4, max_grad_norm=1.0)
    backend = TritonAdamW()

    def collect() -> StepTensors:
        return opt._collect()[0]

    def collect_and_tables() -> StepTensors:
        work, buckets = opt._collect()
        backend.tables.refresh(work, buckets, backend.chunk_size())
        return work

    collect_and_tables()  # first step: state and tables are created here
    ref = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ref.step()  # state initialisation

    def init_group() -> None:
        ref._init_group(ref.param_groups[0], [], [], [], [], [], [])

    fns = {"collect": collect, "total": collect_and_tables, "torch": init_group}
    print(f"{len(params)} tensors, median of {args.repeats} steps (us)")
    print(f"{'gradients':>10} {'_collect':>10} {'+ tables':>10} {'torch _init_group':>18}")
    for mode in ("autograd", "new", "same"):
        results = median_us(fns, grad_maker(params, mode), args.repeats)
        print(f"{mode:>10} {results['collect']:10.1f} {results['total']:10.1f} {results['torch']:18.1f}")


if __name__ == "__main__":
    main()
