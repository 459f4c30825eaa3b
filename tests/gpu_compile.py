"""Compile every Triton kernel's GPU variants for a CUDA architecture on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never compiles them: a kernel that the interpreter runs
can still fail to compile for a GPU, or compile differently with another Triton release (the GPU machines we are
lent have an older Triton than CI). This script calls the real launch functions of ``lamelm_fast.kernels`` with CPU
tensors (the GPU tile sizes and configs, since ``TRITON_INTERPRET`` is unset) while Triton believes it drives a CUDA
device of the given architecture; each launch is compiled (the autotuner's configs one by one) and never run. It
reports every (launch, kernel, specialisation, config) it compiled, with its shared memory, whether it uses the
tensor cores and its global memory access widths, and fails on the first one that does not compile.

Run without ``TRITON_INTERPRET``: ``python tests/gpu_compile.py --arch 90`` (tests/test_gpu_compile.py does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Shared memory one block may use (opt-in maximum) per architecture; a config over it fails at load time and the
# autotuner skips it.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


class _CompileOnlyDriver:
    """Just enough of Triton's active driver for JITFunction.run to specialise and compile for ``target``."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class CompileRecorder:
    """Patches JITFunction/Autotuner so that a launch compiles (with warmup) instead of running."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.compiled: list[dict[str, Any]] = []
        self.label = ""  # the launch being compiled
        self._seen: set[str] = set()

    def __enter__(self) -> CompileRecorder:
        self._run, self._tuned_run, self._driver = JITFunction.run, Autotuner.run, driver._active
        recorder = self

        def run(kernel: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            compiled = recorder._run(kernel, *args, grid=grid, warmup=True, **kwargs)
            recorder._record(kernel, compiled, kwargs)
            return compiled

        def tuned_run(tuner: Autotuner, *args: Any, **kwargs: Any) -> None:
            for config in tuner.configs:  # every config the GPU would time
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())

        JITFunction.run, Autotuner.run = run, tuned_run
        driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", self.arch, 32)))
        return self

    def __exit__(self, *exc: object) -> None:
        JITFunction.run, Autotuner.run = self._run, self._tuned_run
        driver._active = self._driver  # not reset_active(): that would look for a real GPU driver

    def _record(self, kernel: JITFunction, compiled: Any, kwargs: dict[str, Any]) -> None:
        metadata = compiled.metadata
        switches = {k: str(v) for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        key = json.dumps([self.label, kernel.fn.__name__, compiled.hash if hasattr(compiled, "hash") else "",
                          switches], sort_keys=True)
        if key in self._seen:
            return
        self._seen.add(key)
        ptx = compiled.asm.get("ptx", "")
        self.compiled.append({
            "launch": self.label, "kernel": kernel.fn.__name__, "switches": switches, "shared": metadata.shared,
            "num_warps": metadata.num_warps, "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx,
            "accesses": sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))),
        })


Launches = dict[str, Callable[[], object]]  # label -> a call of a launch function


def _cross_entropy_launches() -> Launches:
    from lamelm_fast.kernels import cross_entropy as k

    def rows(dtype: torch.dtype, vocab: int, grad: str, softcap: float | None, correct: bool) -> Callable[[], None]:
        def launch() -> None:
            n = 3
            logits = torch.randn(n, vocab, dtype=dtype)
            scale = {"none": None, "scalar": torch.ones(()), "rows": torch.ones(n)}[grad]
            k.cross_entropy_rows(logits, torch.zeros(n, dtype=torch.int64), torch.empty(n),
                                 torch.empty(n, dtype=torch.int32) if correct else None, scale, ignore_index=-100,
                                 label_smoothing=0.1, z_loss=1e-4, logit_scale=1.0, softcap=softcap)
        return launch

    launches = {f"ce rows {dtype} V={vocab}": rows(dtype, vocab, "scalar", None, True)
                for dtype in (torch.bfloat16, torch.float16, torch.float32) for vocab in (32000, 128256)}
    launches["ce rows per-row scale softcap"] = rows(torch.bfloat16, 256000, "rows", 30.0, False)
    launches["ce rows no gradient"] = rows(torch.bfloat16, 32000, "none", None, True)
    for dtype in (torch.bfloat16, torch.float32):
        launches[f"ce scale {dtype}"] = lambda dtype=dtype: k.scale_inplace(torch.randn(5, 7, dtype=dtype),
                                                                            torch.ones(()))
    return launches


def _rms_norm_launches() -> Launches:
    from lamelm_fast.kernels import rms_norm as k

    def forward(dtype: torch.dtype, w_dtype: torch.dtype, hidden: int, offset: float, cast: bool,
                store_rstd: bool) -> Callable[[], None]:
        def launch() -> None:
            n = 3
            out_dtype = torch.promote_types(dtype, w_dtype) if cast else dtype
            k.rms_norm_forward(torch.randn(n, hidden, dtype=dtype), torch.ones(hidden, dtype=w_dtype),
                               torch.empty(n, hidden, dtype=out_dtype), torch.empty(n) if store_rstd else None,
                               eps=1e-6, offset=offset, cast_before_weight=cast)
        return launch

    def backward(dtype: torch.dtype, w_dtype: torch.dtype, hidden: int, offset: float, cast: bool, dx: bool,
                 dw: bool) -> Callable[[], None]:
        def launch() -> None:
            n = 3
            out_dtype = torch.promote_types(dtype, w_dtype) if cast else dtype
            k.rms_norm_backward(torch.randn(n, hidden, dtype=out_dtype), torch.randn(n, hidden, dtype=dtype),
                                torch.ones(hidden, dtype=w_dtype), torch.ones(n),
                                torch.empty(n, hidden, dtype=dtype) if dx else None, offset=offset,
                                cast_before_weight=cast, weight_grad=dw)
        return launch

    bf16, fp32 = torch.bfloat16, torch.float32
    launches: Launches = {}
    # (input, weight, H, offset, cast_before_weight): Llama fp32 (QLoRA residual) and bf16, Gemma, Qwen3's
    # head-dim q/k norm (128: 16 rows per program), odd widths, and the widest row a program holds.
    for dtype, w_dtype, hidden, offset, cast in [
            (fp32, fp32, 2048, 0.0, True), (bf16, bf16, 2048, 0.0, True), (bf16, fp32, 4096, 0.0, True),
            (bf16, bf16, 5120, 1.0, False), (fp32, fp32, 3072, 1.0, False), (bf16, bf16, 128, 0.0, True),
            (fp32, fp32, 128, 1.0, False), (bf16, bf16, 16384, 0.0, True), (bf16, bf16, k.MAX_HIDDEN, 0.0, True)]:
        name = f"{str(dtype).removeprefix('torch.')}/{str(w_dtype).removeprefix('torch.')} H={hidden} " \
               f"offset={offset:g} {'llama' if cast else 'gemma'}"
        launches[f"rms_norm forward {name}"] = forward(dtype, w_dtype, hidden, offset, cast, True)
        launches[f"rms_norm backward dx+dw {name}"] = backward(dtype, w_dtype, hidden, offset, cast, True, True)
        launches[f"rms_norm backward dx {name}"] = backward(dtype, w_dtype, hidden, offset, cast, True, False)
    launches["rms_norm forward no rstd"] = forward(bf16, bf16, 2048, 0.0, True, False)
    launches["rms_norm backward dw only"] = backward(fp32, fp32, 2048, 0.0, True, False, True)
    return launches


def _swiglu_launches() -> Launches:
    from lamelm_fast.kernels import swiglu as k

    def forward(dtype: torch.dtype) -> Callable[[], None]:
        return lambda: k.swiglu_forward(*(torch.randn(3, 1024, dtype=dtype) for _ in range(3)))

    def backward(dtype: torch.dtype) -> Callable[[], None]:
        return lambda: k.swiglu_backward(*(torch.randn(3, 1024, dtype=dtype) for _ in range(5)))

    return {f"swiglu {direction} {dtype}": launch(dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)
            for direction, launch in (("forward", forward), ("backward", backward))}


def _lora_backward_launches() -> Launches:
    """The adapter products of the LoRA backward: fp32 (QLoRA activations) and bf16 gradients, bf16 and fp32
    adapters, r = 16 and 64; out = 8192 splits into column groups (fp32 gb partials), out = 512 does not."""
    from lamelm_fast.kernels import lora_backward as k

    def launch(grad_dtype: torch.dtype, lora_dtype: torch.dtype, rank: int, out: int) -> Callable[[], object]:
        return lambda: k.lora_output_grad(torch.randn(1024, out, dtype=grad_dtype), torch.randn(out, rank),
                                          torch.randn(1024, rank, dtype=lora_dtype), lora_dtype=lora_dtype)

    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    return {f"lora_backward grad {names[grad]} adapter {names[lora]} r={rank} out={out}": launch(grad, lora, rank, out)
            for grad in names for lora in names for rank in (16, 64) for out in (8192, 512)}


def _rope_launches() -> Launches:
    """Forward and backward, fp32 (QLoRA) and bf16, bf16 q with fp32 cos (fp32 result), head dims 64, 80 (padded
    half tile) and 128, at Llama-3 head counts (32 q, 8 kv) in HF's transposed [B, S, heads, d] memory layout."""
    from lamelm_fast.kernels import rope as k

    def launch(dtype: torch.dtype, cos_dtype: torch.dtype, autocast: torch.dtype | None, dim: int,
               backward: bool) -> Callable[[], None]:
        def run() -> None:
            batch, seq, heads, kv_heads = 2, 3, 32, 8
            out_dtype = autocast or torch.promote_types(dtype, cos_dtype)  # autocast: narrower, fp32 products
            q, dq = (torch.randn(batch, seq, heads, dim).transpose(1, 2) for _ in range(2))
            kk, dk = (torch.randn(batch, seq, kv_heads, dim).transpose(1, 2) for _ in range(2))
            cos, sin = (torch.randn(1, seq, dim, dtype=cos_dtype).expand(batch, seq, dim) for _ in range(2))
            if backward:  # output gradients in the result dtype in, input gradients in the input dtype out
                k.rope_backward(dq.to(out_dtype), dk.to(out_dtype), cos, sin, q.to(dtype), kk.to(dtype),
                                autocast is not None)
            else:
                k.rope_forward(q.to(dtype), kk.to(dtype), cos, sin, dq.to(out_dtype), dk.to(out_dtype),
                               autocast is not None)
        return run

    dtypes = {"fp32": (torch.float32, torch.float32, None), "bf16": (torch.bfloat16, torch.bfloat16, None),
              "bf16 q fp32 cos": (torch.bfloat16, torch.float32, None),
              "fp32 q under bf16 autocast": (torch.float32, torch.float32, torch.bfloat16)}
    return {f"rope {'backward' if backward else 'forward'} {name} d={dim}": launch(*dtypes_, dim, backward)
            for name, dtypes_ in dtypes.items() for dim in (64, 80, 128) for backward in (False, True)}


def _nf4_launches() -> Launches:
    import bitsandbytes.functional as bnb_functional

    from lamelm_fast.kernels import nf4_lora as k
    from lamelm_fast.ops.quant4bit import Packed4bit

    def packed(rows: int, cols: int, nested: bool, blocksize: int = 64, quant_type: str = "nf4") -> Packed4bit:
        weight = torch.randn(rows, cols)
        return Packed4bit.from_bnb(*bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                                 compress_statistics=nested))

    def matmul(dtype: torch.dtype, rows: int, nested: bool, transposed: bool, lora: bool, bias: bool,
               accumulate: bool) -> Callable[[], None]:
        def launch() -> None:
            w = packed(96, 128, nested)
            p, q = (96, 128) if transposed else (128, 96)
            a = torch.randn(rows, q, dtype=dtype)
            factors = (torch.randn(rows, 16, dtype=dtype), torch.randn(16, p, dtype=dtype)) if lora else None
            out = torch.randn(rows, p, dtype=dtype) if accumulate else None
            k.matmul_4bit_lora(a, w, weight_transposed=transposed, lora=factors, scale=0.5,
                               bias=torch.randn(p, dtype=dtype) if bias else None, out=out, accumulate=accumulate)
        return launch

    def dequantize(rows: int, cols: int, nested: bool, blocksize: int, dtype: torch.dtype) -> Callable[[], None]:
        return lambda: k.dequantize_4bit(packed(rows, cols, nested, blocksize), torch.empty(rows, cols, dtype=dtype))

    return {
        "nf4 dequantize nested bf16": dequantize(96, 128, True, 64, torch.bfloat16),
        "nf4 dequantize fp16": dequantize(96, 128, False, 64, torch.float16),
        "nf4 dequantize blocks across rows": dequantize(5, 96, False, 64, torch.float32),
        "nf4 dequantize odd columns": dequantize(7, 33, True, 32, torch.bfloat16),
        # The autotuned GEMM: forward (LoRA + bias), input gradient accumulated (fused MLP / QKV), no LoRA.
        "nf4 gemm forward": matmul(torch.bfloat16, 64, True, True, True, True, False),
        "nf4 gemm input gradient": matmul(torch.bfloat16, 64, True, False, True, False, True),
        "nf4 gemm no lora": matmul(torch.float16, 64, False, True, False, False, False),
        # Dequantize + cuBLAS (the other strategy): W written into the rows of a wider GEMM operand, with the
        # scaled LoRA factor beside it (forward) or below it (input gradient; q/k/v's three in one operand).
        "nf4 dequantize then cublas": lambda: k.dequant_matmul_4bit_lora(
            torch.randn(64, 128), packed(96, 128, True), dtype=torch.bfloat16,
            lora=(torch.randn(64, 16), torch.randn(16, 96)), scale=0.5, placement="concat"),
        "nf4 dequantize then cublas, input gradient": lambda: k.dequant_matmul_4bit_lora(
            torch.randn(64, 96), packed(96, 128, True), dtype=torch.bfloat16, weight_transposed=False,
            lora=(torch.randn(64, 16), torch.randn(16, 128)), scale=0.5, placement="concat"),
        "nf4 q/k/v input gradient in one gemm": lambda: k.dequant_matmul_4bit_lora_sum(
            [(torch.randn(64, rows), packed(rows, 128, True), (torch.randn(64, 16), torch.randn(16, 128)), 0.5)
             for rows in (96, 32, 32)], dtype=torch.bfloat16, out=torch.empty(64, 128)),
        "nf4 gemv forward": matmul(torch.bfloat16, 1, True, True, True, True, False),
        "nf4 gemv input gradient": matmul(torch.bfloat16, 3, False, False, True, False, True),
    }


def _adamw_launches() -> Launches:
    from lamelm_fast.kernels import adamw as k
    from lamelm_fast.optim._adamw_triton import _GPU_CONFIG

    chunk_size, block, num_warps = _GPU_CONFIG
    tables = {"meta": torch.zeros(3, k.META_WIDTH, dtype=torch.int64), "grads": torch.zeros(3, dtype=torch.int64),
              "chunks": torch.zeros(5, 2, dtype=torch.int64)}
    config = {"chunk_size": chunk_size, "block": block, "num_warps": num_warps}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    launches: Launches = {
        f"adamw sum_squares {name} aligned": lambda dtype=dtype: k.sum_squares(
            **tables, partials=torch.empty(5), grad_dtype=dtype, aligned=True, **config)
        for name, dtype in dtypes.items()}
    launches["adamw sum_squares fp32 unaligned"] = lambda: k.sum_squares(
        **tables, partials=torch.empty(5), grad_dtype=torch.float32, aligned=False, **config)
    launches["adamw finalize"] = lambda: k.finalize(torch.empty(5), tables["meta"], torch.empty(()),
                                                    torch.zeros((), dtype=torch.int64))
    # (param, grad, master, stochastic, aligned): each switch on and off at least once.
    for param, grad, master, stochastic, aligned in [
            ("fp32", "fp32", False, False, True), ("fp32", "fp32", False, False, False),
            ("bf16", "bf16", True, False, True), ("bf16", "bf16", False, True, True),
            ("bf16", "fp32", True, True, False), ("fp16", "fp16", True, False, True),
            ("fp16", "fp32", False, False, True)]:
        label = (f"adamw update {param} grad {grad} master={master} stochastic={stochastic} "
                 f"{'aligned' if aligned else 'unaligned'}")
        launches[label] = lambda p=param, g=grad, m=master, st=stochastic, al=aligned: k.adamw_update(
            **tables, hyper=torch.zeros(2, k.HYPER_WIDTH, dtype=torch.float64), norm=torch.empty(()),
            param_dtype=dtypes[p], grad_dtype=dtypes[g], master=m, stochastic=st, seed=7, aligned=al, **config)
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES),
                        help="CUDA compute capability as an int")
    args = parser.parse_args(argv)
    with CompileRecorder(args.arch) as recorder:
        for label, launch in {**_cross_entropy_launches(), **_rms_norm_launches(), **_swiglu_launches(),
                              **_lora_backward_launches(), **_rope_launches(), **_nf4_launches(),
                              **_adamw_launches()}.items():
            recorder.label = label
            launch()
    too_big = [c for c in recorder.compiled if c["shared"] > MAX_SHARED_BYTES[args.arch]]
    print(json.dumps({"triton": triton.__version__, "arch": args.arch, "compiled": recorder.compiled,
                      "over_shared_limit": too_big}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
