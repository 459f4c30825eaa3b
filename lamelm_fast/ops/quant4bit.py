"""bitsandbytes 4-bit weights (NF4 / FP4) read in their own storage, and their dequantization.

The layout, as bitsandbytes writes it: the ``[out, in]`` weight flattened row-major; two 4-bit codes per byte, the
first value in the HIGH nibble; one scale ("absmax") per ``blocksize`` consecutive values of the flat weight (so a
block straddles rows when ``in`` is not a multiple of it). The scales are fp32, or with double quantization uint8
codes into a 256-entry fp32 table, times one fp32 absmax per ``nested_blocksize`` scales, plus one fp32 offset.

:func:`dequantize_reference` is the torch path (CPU, and the test oracle of the Triton kernel);
:func:`dequantize` dispatches between the two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from lamelm_fast.ops.dispatch import resolve_backend

__all__ = ["QUANT_TYPES", "Packed4bit", "Unsupported4bit", "code_table", "dequantize", "dequantize_reference"]

# NF4: the 16 quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, Dettmers et al. 2023), as fp32.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# bitsandbytes' FP4: bit 3 is the sign; bits 2..0 give these magnitudes (exponent bits 2..1, mantissa bit 0, with
# bitsandbytes' own exponent order), divided by the largest. Code 8 is -0.0, as its kernels return it.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_BLOCKSIZES = tuple(2**i for i in range(5, 13))  # 32 .. 4096
QUANT_TYPES = ("nf4", "fp4")
_KEPT_ATTRIBUTE = "_lamelm_packed"  # Packed4bit.of's (key, Packed4bit) on a bitsandbytes QuantState


class Unsupported4bit(ValueError):
    """This 4-bit weight is not in a layout our kernels read; the message says what differs."""


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise Unsupported4bit(f"4-bit quant_type {quant_type!r} is not nf4 or fp4")


@functools.cache
def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 values a 4-bit code stands for (before scaling by its block's absmax)."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    magnitudes = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / max(_FP4_MAGNITUDES)
    return torch.cat([magnitudes, -magnitudes]).to(device)


@dataclass(frozen=True)
class Packed4bit:
    """One bitsandbytes 4-bit weight, as views of its own tensors (nothing is copied)."""

    data: torch.Tensor  # uint8, flat: ceil(out * in / 2) bytes
    shape: tuple[int, int]  # (out_features, in_features)
    quant_type: str
    blocksize: int
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] when nested
    nested_absmax: torch.Tensor | None  # fp32 [ceil(blocks / nested_blocksize)]
    nested_code: torch.Tensor | None  # fp32 [256]
    nested_offset: torch.Tensor | None  # fp32, 0-dim
    nested_blocksize: int

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def table(self) -> torch.Tensor:
        return code_table(self.quant_type, self.data.device)

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state: Any) -> Packed4bit:
        """Read a ``bnb.nn.Params4bit`` (any ``quant_storage`` dtype) and its ``QuantState``."""
        if quant_state is None:
            raise Unsupported4bit("the weight has no quant_state: it is not quantized (yet)")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise Unsupported4bit("the weight was repacked into bitsandbytes' CPU inference layout")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise Unsupported4bit(f"quant_state.shape {list(shape)} is not 2-D")
        _check_quant_type(quant_state.quant_type)
        if quant_state.blocksize not in _BLOCKSIZES:
            raise Unsupported4bit(f"blocksize {quant_state.blocksize} is not a power of two in 32..4096")
        data = weight.detach().reshape(-1).view(torch.uint8)
        if data.numel() != (shape[0] * shape[1] + 1) // 2:
            raise Unsupported4bit(f"{data.numel()} packed bytes do not hold a {list(shape)} weight")
        blocks = -(-shape[0] * shape[1] // quant_state.blocksize)
        if quant_state.absmax.numel() != blocks:
            raise Unsupported4bit(f"{quant_state.absmax.numel()} absmax values for {blocks} blocks")
        if not quant_state.nested:
            if quant_state.absmax.dtype != torch.float32:
                raise Unsupported4bit(f"absmax dtype {quant_state.absmax.dtype} is not float32")
            return cls(data, shape, quant_state.quant_type, quant_state.blocksize, quant_state.absmax,
                       None, None, None, 0)
        nested = quant_state.state2
        nested_blocksize = nested.blocksize
        if (quant_state.absmax.dtype != torch.uint8 or nested.code.numel() != 256
                or nested_blocksize & (nested_blocksize - 1) or nested_blocksize <= 0):
            raise Unsupported4bit("double quantization other than uint8 codes, a 256-entry table and a "
                                  "power-of-two nested blocksize")
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=data.device).reshape(())
        return cls(data, shape, quant_state.quant_type, quant_state.blocksize, quant_state.absmax,
                   nested.absmax.float(), nested.code.float(), offset, nested_blocksize)

    @classmethod
    def of(cls, weight: torch.Tensor, quant_state: Any) -> Packed4bit:
        """:meth:`from_bnb`, read once per weight and kept on its ``QuantState``: the layers ask at every call (twice
        per step under activation checkpointing), and the checks cost more host time than a launch. The kept one is
        used while the weight's and the scales' storage are the ones it was read from (a move, a reload or a copy
        makes new storage: then it is read again)."""
        if quant_state is None or torch.compiler.is_compiling():  # dynamo traces no data_ptr() nor a setattr
            return cls.from_bnb(weight, quant_state)
        # bitsandbytes' Params4bit is a tensor subclass: each attribute would go through its __torch_function__
        # (~1.5 us apiece, ~8x the key's cost without it; the layers ask several hundred times per step).
        with torch._C.DisableTorchFunctionSubclass():
            key = (weight.device, weight.data_ptr(), weight.numel(), quant_state.absmax.data_ptr())
        kept = getattr(quant_state, _KEPT_ATTRIBUTE, None)
        if kept is not None and kept[0] == key:
            return kept[1]
        packed = cls.from_bnb(weight, quant_state)
        setattr(quant_state, _KEPT_ATTRIBUTE, (key, packed))
        return packed


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scales[i // blocksize]`` in fp32; the last block may be short."""
    padded = values.new_zeros(scales.numel() * blocksize)
    padded[: values.numel()] = values
    return padded.view(-1, blocksize).mul_(scales[:, None]).view(-1)[: values.numel()]


def block_scales(w: Packed4bit) -> torch.Tensor:
    """The fp32 absmax of every block, undoing double quantization (scale, then add the offset: two roundings,
    as bitsandbytes does them)."""
    if not w.nested:
        return w.absmax
    codes = w.nested_code.index_select(0, w.absmax.int())
    return _scale_blocks(codes, w.nested_absmax, w.nested_blocksize).add_(w.nested_offset)


def dequantize_reference(w: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` weight in ``dtype``: code value times block absmax in fp32, rounded once to ``dtype``."""
    numel = w.shape[0] * w.shape[1]
    codes = torch.stack((w.data >> 4, w.data & 15), dim=1).view(-1)[:numel]
    values = w.table.index_select(0, codes.int())
    return _scale_blocks(values, block_scales(w), w.blocksize).view(w.shape).to(dtype)


def dequantize(w: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_reference`, on the backend :func:`~lamelm_fast.ops.dispatch.resolve_backend` picks."""
    if resolve_backend(w.data.device) == "triton":
        from lamelm_fast.kernels import nf4_lora

        return nf4_lora.dequantize_4bit(w, torch.empty(w.shape, dtype=dtype, device=w.data.device))
    return dequantize_reference(w, dtype)
