"""Multi-tensor AdamW with global grad-norm clipping: Triton kernels and their launch functions.

A step is three kinds of launch, whatever the number of tensors:

1. ``sum_squares``: one program per chunk of a gradient writes that chunk's fp32 sum of squares.
2. ``finalize``: one program sums the partials in a fixed order (deterministic, no atomics), writes the norm,
   counts a skipped step when it is not finite and advances every tensor's step counter when it is.
3. ``adamw_update``: one program per chunk reads the norm, clips in registers and applies AdamW.

Multi-tensor layout: a device int64 table with one row per tensor (``META_WIDTH`` columns: data pointers of
param, moments, master copy and step counter, numel, param group, a stable param id), a vector of gradient
pointers (one per row: gradients are re-allocated every step, so they live apart from what stays put) and a chunk
table (row, chunk index within the tensor); lamelm_fast/optim/_adamw_tables.py builds them, and the CUDA kernels
(csrc/adamw.cu) read the same ones. Kernels load a pointer from a table and cast it with ``tl.pointer_type``; this
works compiled and in the interpreter, whose loads go to raw host addresses. Pointers loaded from memory carry no
alignment facts, so the caller states alignment (``aligned``) and the kernel re-asserts it with
``tl.multiple_of``; chunk starts are ``index * CHUNK``, which Triton knows to be multiples of CHUNK, and full
chunks run unmasked: together these allow 16-byte vector accesses.

Arithmetic on loaded values is fp32 (bf16/fp16 are only storage: the interpreter cannot do bf16 arithmetic, and
fp32 is what torch.optim.AdamW computes in). Per-tensor scalars (bias corrections, step size) are fp64, as
torch computes them in Python floats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the tensor table, one row per tensor; csrc/adamw.h mirrors them (LAMELM_META_*), so the CUDA kernels
# read the same tables. Unused pointer columns (no master copy) hold 0. Gradient pointers are a separate vector.
META_COLUMNS = ("param", "exp_avg", "exp_avg_sq", "master", "step", "numel", "group", "param_id")
META_WIDTH = len(META_COLUMNS)
_PARAM = tl.constexpr(META_COLUMNS.index("param"))
_EXP_AVG = tl.constexpr(META_COLUMNS.index("exp_avg"))
_EXP_AVG_SQ = tl.constexpr(META_COLUMNS.index("exp_avg_sq"))
_MASTER = tl.constexpr(META_COLUMNS.index("master"))
_STEP = tl.constexpr(META_COLUMNS.index("step"))
_NUMEL = tl.constexpr(META_COLUMNS.index("numel"))
_GROUP = tl.constexpr(META_COLUMNS.index("group"))
_PARAM_ID = tl.constexpr(META_COLUMNS.index("param_id"))
_META_WIDTH = tl.constexpr(META_WIDTH)

# Columns of the fp64 hyperparameter table, one row per param group (csrc/adamw.h: LAMELM_LR...). No clipping = +inf.
HYPER_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay", "max_norm")
HYPER_WIDTH = len(HYPER_COLUMNS)
_LR = tl.constexpr(HYPER_COLUMNS.index("lr"))
_BETA1 = tl.constexpr(HYPER_COLUMNS.index("beta1"))
_BETA2 = tl.constexpr(HYPER_COLUMNS.index("beta2"))
_EPS = tl.constexpr(HYPER_COLUMNS.index("eps"))
_WEIGHT_DECAY = tl.constexpr(HYPER_COLUMNS.index("weight_decay"))
_MAX_NORM = tl.constexpr(HYPER_COLUMNS.index("max_norm"))
_HYPER_WIDTH = tl.constexpr(HYPER_WIDTH)

_FLT_MAX = tl.constexpr(3.4028234663852886e38)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def meta_row(param: int, exp_avg: int, exp_avg_sq: int, master: int, step: int, numel: int, group: int,
             param_id: int) -> tuple[int, ...]:
    """One row of the tensor table, in ``META_COLUMNS`` order (data pointers as ints; ``master`` 0 without a master
    copy)."""
    return (param, exp_avg, exp_avg_sq, master, step, numel, group, param_id)


def hyper_row(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              max_grad_norm: float | None) -> tuple[float, ...]:
    """One row of the hyperparameter table."""
    return (lr, beta1, beta2, eps, weight_decay, float("inf") if max_grad_norm is None else max_grad_norm)


@triton.jit
def _table_pointer(entry, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(entry).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _mix32(x):
    # A 32-bit integer hash (bijective, good avalanche); the CUDA kernels and the torch reference use the same one
    # so that stochastic rounding draws identical bits on every backend.
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def _round_to_bf16(x, offs, key, STOCHASTIC: tl.constexpr):
    """fp32 ``x`` rounded to a value exactly representable in bf16, by integer ops on its bits.

    Nearest-even: add 0x7FFF plus the lowest kept bit, then truncate (done here because the interpreter's fp32->bf16
    cast truncates). Stochastic: add 16 random bits instead, which rounds up with probability equal to the
    discarded fraction, so the result is unbiased.
    """
    bits = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        bits += _mix32(offs.to(tl.uint32) ^ key) & 0xFFFF
    else:
        bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits & tl.full((), 0xFFFF0000, tl.uint32)).to(tl.float32, bitcast=True)


@triton.jit
def _one_minus_pow(beta, exponent):
    """``1 - beta**exponent`` in fp64 by square-and-multiply (no precise exp/pow needed), exponent < 2**31."""
    power = tl.full((), 1.0, tl.float64)
    for _ in range(31):
        power = tl.where((exponent & 1) != 0, power * beta, power)
        beta = beta * beta
        exponent = exponent >> 1
    return 1.0 - power


@triton.jit
def _chunk_sum_squares(grad, start, numel, MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if MASKED:
        end = numel - start
    else:
        end = CHUNK
    for offset in range(0, end, BLOCK):
        offs = start + offset + tl.arange(0, BLOCK)
        if MASKED:
            g = tl.load(grad + offs, mask=offs < numel, other=0.0).to(tl.float32)
        else:
            g = tl.load(grad + offs).to(tl.float32)
        acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit
def _sum_squares_kernel(meta, grads, chunks, partials, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    index = tl.load(chunks + 2 * pid)
    row = meta + index * _META_WIDTH
    start = tl.load(chunks + 2 * pid + 1) * CHUNK
    numel = tl.load(row + _NUMEL)
    grad = _table_pointer(grads + index, GRAD_DTYPE, ALIGNED)
    if start + CHUNK <= numel:
        total = _chunk_sum_squares(grad, start, numel, False, CHUNK, BLOCK)
    else:
        total = _chunk_sum_squares(grad, start, numel, True, CHUNK, BLOCK)
    tl.store(partials + pid, total)


@triton.jit
def _finalize_kernel(partials, num_partials, meta, num_tensors, norm_out, skipped, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < num_partials, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    tl.store(norm_out, norm)
    finite = norm <= _FLT_MAX  # False for inf and NaN
    tl.store(skipped, tl.load(skipped) + 1 - finite.to(tl.int64))
    for start in range(0, num_tensors, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = rows < num_tensors
        steps = tl.load(meta + rows * _META_WIDTH + _STEP, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(steps, tl.load(steps, mask=mask, other=0.0) + finite.to(tl.float32), mask=mask)


@triton.jit
def _update_chunk(param, grad, exp_avg, exp_avg_sq, master, start, numel, key, clip, lerp_weight, beta2,
                  one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt, PARAM_DTYPE: tl.constexpr,
                  MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    if MASKED:
        end = numel - start
    else:
        end = CHUNK
    for offset in range(0, end, BLOCK):
        offs = start + offset + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < numel
            other = 0.0
        else:
            mask = None
            other = None
        g = tl.load(grad + offs, mask=mask, other=other).to(tl.float32) * clip
        m = tl.load(exp_avg + offs, mask=mask, other=other)
        v = tl.load(exp_avg_sq + offs, mask=mask, other=other)
        if MASTER:
            p = tl.load(master + offs, mask=mask, other=other)
        else:
            p = tl.load(param + offs, mask=mask, other=other).to(tl.float32)
        # torch.lerp's two forms (which one depends on the weight), so moments match torch.optim.AdamW's rounding.
        m = tl.where(lerp_weight < 0.5, m + lerp_weight * (g - m), g - (g - m) * (1.0 - lerp_weight))
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p * decay - step_size * tl.div_rn(m, denom)
        tl.store(exp_avg + offs, m, mask=mask)
        tl.store(exp_avg_sq + offs, v, mask=mask)
        if MASTER:
            tl.store(master + offs, p, mask=mask)
        if PARAM_DTYPE == tl.bfloat16:
            p = _round_to_bf16(p, offs, key, STOCHASTIC)
        tl.store(param + offs, p.to(PARAM_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _adamw_kernel(meta, grads, chunks, hyper, norm_ptr, seed, PARAM_DTYPE: tl.constexpr,
                  GRAD_DTYPE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    index = tl.load(chunks + 2 * pid)
    row = meta + index * _META_WIDTH
    start = tl.load(chunks + 2 * pid + 1) * CHUNK
    norm = tl.load(norm_ptr)
    if norm <= _FLT_MAX:  # a non-finite norm skips the step: nothing is written
        numel = tl.load(row + _NUMEL)
        group = hyper + tl.load(row + _GROUP) * _HYPER_WIDTH
        lr = tl.load(group + _LR)
        beta1 = tl.load(group + _BETA1)
        beta2 = tl.load(group + _BETA2)
        # Same formula and fp32 rounding as clip_grad_norm_; +inf max norm = no clipping.
        clip = tl.minimum(tl.div_rn(tl.load(group + _MAX_NORM).to(tl.float32), norm + 1e-6), 1.0)
        # The finalize kernel already advanced the step counter of this (finite) step.
        step = tl.load(tl.load(row + _STEP).to(tl.pointer_type(tl.float32))).to(tl.int32)
        bias_correction1 = _one_minus_pow(beta1, step)
        bias_correction2 = _one_minus_pow(beta2, step)
        step_size = (lr / bias_correction1).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
        decay = (1.0 - lr * tl.load(group + _WEIGHT_DECAY)).to(tl.float32)
        key = tl.full((), 0, tl.uint32)
        if STOCHASTIC:
            param_id = tl.load(row + _PARAM_ID).to(tl.uint32)
            key = _mix32(seed.to(tl.uint32) ^ _mix32(param_id ^ _mix32(step.to(tl.uint32))))
        param = _table_pointer(row + _PARAM, PARAM_DTYPE, ALIGNED)
        grad = _table_pointer(grads + index, GRAD_DTYPE, ALIGNED)
        exp_avg = _table_pointer(row + _EXP_AVG, tl.float32, ALIGNED)
        exp_avg_sq = _table_pointer(row + _EXP_AVG_SQ, tl.float32, ALIGNED)
        master = _table_pointer(row + _MASTER, tl.float32, ALIGNED)
        lerp_weight = (1.0 - beta1).to(tl.float32)
        one_minus_beta2 = (1.0 - beta2).to(tl.float32)
        eps = tl.load(group + _EPS).to(tl.float32)
        if start + CHUNK <= numel:
            _update_chunk(param, grad, exp_avg, exp_avg_sq, master, start, numel, key, clip, lerp_weight,
                          beta2.to(tl.float32), one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt,
                          PARAM_DTYPE, MASTER, STOCHASTIC, False, CHUNK, BLOCK)
        else:
            _update_chunk(param, grad, exp_avg, exp_avg_sq, master, start, numel, key, clip, lerp_weight,
                          beta2.to(tl.float32), one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt,
                          PARAM_DTYPE, MASTER, STOCHASTIC, True, CHUNK, BLOCK)


def sum_squares(meta: torch.Tensor, grads: torch.Tensor, chunks: torch.Tensor, partials: torch.Tensor, *,
                grad_dtype: torch.dtype, aligned: bool, chunk_size: int, block: int, num_warps: int = 4) -> None:
    """``partials[i]`` = fp32 sum of squares of chunk ``chunks[i]`` (``[n, 2]`` int64: table row, chunk index) of
    the gradient whose pointer is ``grads[row]``."""
    if chunks.shape[0]:
        _sum_squares_kernel[(chunks.shape[0],)](meta, grads, chunks, partials, _TL_DTYPES[grad_dtype], aligned,
                                                chunk_size, block, num_warps=num_warps)


def finalize(partials: torch.Tensor, meta: torch.Tensor, norm: torch.Tensor, skipped: torch.Tensor, *,
             block: int = 1024, num_warps: int = 4) -> None:
    """``norm`` = sqrt(sum(partials)); ``skipped`` += 1 if it is not finite, else every table row's step += 1."""
    _finalize_kernel[(1,)](partials, partials.numel(), meta, meta.shape[0], norm, skipped, block,
                           num_warps=num_warps)


def adamw_update(meta: torch.Tensor, grads: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor,
                 norm: torch.Tensor, *, param_dtype: torch.dtype, grad_dtype: torch.dtype, master: bool,
                 stochastic: bool, seed: int, aligned: bool, chunk_size: int, block: int, num_warps: int = 4) -> None:
    """Clip by ``norm`` and apply AdamW to every chunk of ``chunks``; nothing is written if ``norm`` is not finite.

    ``stochastic`` rounds the written param (bf16 only) stochastically; ``master`` reads and writes the fp32 copy.
    """
    if stochastic and param_dtype != torch.bfloat16:
        raise ValueError("stochastic rounding is implemented for bf16 params only")
    if chunks.shape[0]:
        _adamw_kernel[(chunks.shape[0],)](meta, grads, chunks, hyper, norm, seed, _TL_DTYPES[param_dtype],
                                          _TL_DTYPES[grad_dtype], master, stochastic, aligned, chunk_size, block,
                                          num_warps=num_warps)
