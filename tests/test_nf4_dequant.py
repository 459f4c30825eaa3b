"""Our 4-bit dequantization (torch reference and Triton kernel) against bitsandbytes, bit for bit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from lamelm_fast.ops.dispatch import use_backend  # noqa: E402
from lamelm_fast.ops.quant4bit import Packed4bit, Unsupported4bit, code_table, dequantize  # noqa: E402


@pytest.fixture(autouse=True)
def eager_bitsandbytes() -> Iterator[None]:
    # bitsandbytes torch.compiles its portable dequantization (odd in_features, blocksize >= 2048 on CPU) once per
    # shape, seconds each on 2 cores; eager computes the same values. Imported by the other 4-bit test modules.
    with torch._dynamo.config.patch(disable=True):
        yield


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Adding +0.0 turns -0.0 into +0.0 and changes nothing else: bitsandbytes itself returns either sign for FP4's
    # code 8 depending on its code path (its C kernels -0.0, its torch fallback +0.0).
    return (t + 0.0).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _quantized(shape: tuple[int, int], quant_type: str, nested: bool, blocksize: int, dtype=torch.float32,
               device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    weight = torch.randn(shape, dtype=dtype, device=device) * 0.7 + 0.1
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                        quant_type=quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_equal_bitsandbytes(quant_type: str) -> None:
    ours = code_table(quant_type, torch.device("cpu"))
    assert torch.equal(ours, bnb_functional.get_4bit_type(quant_type, device="cpu"))


# (shape, blocksize): rows a multiple of the block, blocks shorter and longer than a row, odd in_features (bytes
# straddle rows), a tail block, the extreme blocksizes.
CASES = [((40, 128), 64), ((33, 64), 32), ((6, 256), 128), ((5, 7), 64), ((9, 35), 32), ((7, 50), 128),
         ((3, 1024), 4096), ((2, 4096), 4096), ((11, 512), 256)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_equals_bitsandbytes(quant_type: str, nested: bool, backend: str) -> None:
    for shape, blocksize in CASES:
        q, state = _quantized(shape, quant_type, nested, blocksize, seed=shape[0] * blocksize)
        expected = bnb_functional.dequantize_4bit(q, state)
        with use_backend(backend):
            ours = dequantize(Packed4bit.from_bnb(q, state), torch.float32)
        assert ours.shape == expected.shape, (shape, blocksize)
        assert torch.equal(_bits(ours), _bits(expected)), (shape, blocksize)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_half_dtypes_equal_bitsandbytes(dtype: torch.dtype, backend: str) -> None:
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter rounds fp32 to bf16 toward zero, the GPU to nearest: covered by -m gpu")
    # Quantizing a half tensor makes bitsandbytes dequantize to that dtype: fp32 product rounded once.
    for shape, blocksize in [((24, 192), 64), ((7, 33), 32)]:
        q, state = _quantized(shape, "nf4", True, blocksize, dtype=dtype)
        expected = bnb_functional.dequantize_4bit(q, state)
        with use_backend(backend):
            ours = dequantize(Packed4bit.from_bnb(q, state), dtype)
        assert ours.dtype == expected.dtype == dtype
        assert torch.equal(_bits(ours), _bits(expected)), (shape, blocksize)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_blocks_straddling_rows_follow_the_flat_layout(backend: str) -> None:
    """Blocks run over the flattened weight, across row ends. bitsandbytes' AVX-512 CPU kernel misreads such
    layouts when in_features is even (it scales e.g. [4, 96] with blocksize 64 wrongly), so the oracle here is its
    portable torch implementation, which its CUDA kernel matches (checked on GPU by the test below)."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    for shape, blocksize in [((4, 96), 64), ((5, 1536), 1024), ((6, 40), 64)]:
        q, state = _quantized(shape, "nf4", True, blocksize)
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        expected = default_ops._dequantize_4bit_compute(q.view(-1), absmax, state.code, blocksize, shape,
                                                        torch.float32)
        with use_backend(backend):
            ours = dequantize(Packed4bit.from_bnb(q, state), torch.float32)
        assert torch.equal(_bits(ours), _bits(expected)), (shape, blocksize)


def test_triton_dequantization_into_a_column_slice_of_a_wider_buffer() -> None:
    """The dequant matmul strategy writes W into the first columns of a wider operand buffer: strided rows, and
    nothing outside the slice touched."""
    from lamelm_fast.kernels import nf4_lora

    for shape, blocksize in [((9, 35), 32), ((6, 256), 128)]:
        q, state = _quantized(shape, "nf4", True, blocksize)
        w = Packed4bit.from_bnb(q, state)
        with use_backend("torch"):
            expected = dequantize(w, torch.float32)
        wide = torch.full((shape[0], shape[1] + 13), 7.0)
        nf4_lora.dequantize_4bit(w, wide[:, : shape[1]])
        assert torch.equal(_bits(wide[:, : shape[1]]), _bits(expected)), shape
        assert (wide[:, shape[1]:] == 7.0).all()
    with pytest.raises(ValueError, match="unit column stride"):
        nf4_lora.dequantize_4bit(w, torch.empty(shape[1], shape[0]).t())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triton_dequantization_writes_the_scaled_extra_block_in_the_same_launch(out_dtype: torch.dtype) -> None:
    """The concatenated operand of the dequant matmul strategy: W in the top-left corner and ``scale * extra`` beside
    it (forward: the LoRA B as extra columns) or below it (input gradient: A as extra rows), each extra value scaled
    in fp32 and rounded once; nothing else in the buffer touched. Odd sizes, a transposed (strided) extra, more extra
    tiles than W's column tiles."""
    from lamelm_fast.kernels import nf4_lora

    torch.manual_seed(9)
    for (shape, blocksize), extra_shape, at, pad in [(((9, 35), 32), (9, 5), (0, 35), (0, 3)),
                                                     (((33, 64), 32), (7, 64), (33, 0), (2, 0)),
                                                     (((5, 7), 64), (70, 3), (0, 7), (65, 0))]:
        q, state = _quantized(shape, "nf4", True, blocksize)
        w = Packed4bit.from_bnb(q, state)
        with use_backend("torch"):
            expected = dequantize(w, out_dtype)
        extra = torch.randn(extra_shape[1], extra_shape[0], dtype=torch.float16).t()  # [rows, cols], strided
        buffer = torch.full((max(shape[0], at[0] + extra_shape[0]) + pad[0],
                             max(shape[1], at[1] + extra_shape[1]) + pad[1]), 7.0, dtype=out_dtype)
        nf4_lora.dequantize_4bit(w, buffer, extra=extra, extra_at=at, extra_scale=2.9)
        written = torch.zeros(buffer.shape, dtype=torch.bool)
        written[: shape[0], : shape[1]] = True
        region = (slice(at[0], at[0] + extra_shape[0]), slice(at[1], at[1] + extra_shape[1]))
        written[region] = True
        assert torch.equal(_bits(buffer[: shape[0], : shape[1]]), _bits(expected)), shape
        assert torch.equal(buffer[region], (extra.float() * 2.9).to(out_dtype)), shape
        assert (buffer[~written] == 7.0).all(), shape
    with pytest.raises(ValueError, match=r"out must be at least \[70, 10\]"):
        nf4_lora.dequantize_4bit(w, torch.empty(5, 9, dtype=out_dtype), extra=extra, extra_at=(0, 7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_bitsandbytes_cuda(quant_type: str, dtype: torch.dtype) -> None:
    for nested in (False, True):
        for shape, blocksize in [*CASES, ((4, 96), 64), ((2048, 8192), 64), ((8192, 2048), 64)]:
            q, state = _quantized(shape, quant_type, nested, blocksize, dtype=dtype, device="cuda")
            expected = bnb_functional.dequantize_4bit(q, state)
            for backend in ("torch", "triton"):
                with use_backend(backend):
                    ours = dequantize(Packed4bit.from_bnb(q, state), dtype)
                assert torch.equal(_bits(ours), _bits(expected)), (shape, blocksize, nested, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nested", [False, True])
def test_cpu_and_cuda_quantization_store_the_same_bits(nested: bool) -> None:
    """`export --base quantized` quantizes the base on the CPU; training quantized it on the GPU. The exported model
    computes what was trained only if bitsandbytes stores the same 4-bit codes and scales on both."""
    torch.manual_seed(3)
    weight = torch.randn(512, 2048, dtype=torch.bfloat16) * 0.05
    stored = []
    for device in ("cpu", "cuda"):
        q, state = bnb_functional.quantize_4bit(weight.to(device), blocksize=64, compress_statistics=nested,
                                                quant_type="nf4")
        stored.append(dequantize(Packed4bit.from_bnb(q, state), torch.float32).cpu())
        stored.append(q.cpu())
    cpu_values, cpu_codes, cuda_values, cuda_codes = stored
    mismatched = (cpu_codes != cuda_codes).float().mean().item()
    assert torch.equal(cpu_values, cuda_values), f"{mismatched:.4%} of the code bytes differ"


def test_layouts_we_cannot_read_are_refused_with_the_reason() -> None:
    q, state = _quantized((8, 64), "nf4", False, 64)
    state.packing_format_for_cpu = True
    with pytest.raises(Unsupported4bit, match="CPU inference layout"):
        Packed4bit.from_bnb(q, state)
    q, state = _quantized((8, 64), "nf4", False, 64)
    with pytest.raises(Unsupported4bit, match="packed bytes"):
        Packed4bit.from_bnb(q[:-1], state)


def test_a_weight_is_read_once_until_its_storage_changes() -> None:
    q, state = _quantized((24, 64), "nf4", True, 64)
    packed = Packed4bit.of(q, state)
    assert Packed4bit.of(q, state) is packed  # the layers ask at every call: no second read
    assert torch.equal(dequantize(packed, torch.float32), dequantize(Packed4bit.from_bnb(q, state), torch.float32))
    moved = q.clone()  # a move or reload: new storage under the same QuantState
    assert Packed4bit.of(moved, state) is not packed and Packed4bit.of(moved, state).data.data_ptr() == moved.data_ptr()
    state.absmax = state.absmax.clone()  # QuantState.to() replaces the scales: read again
    again = Packed4bit.of(moved, state)
    assert again.absmax is state.absmax
    with pytest.raises(Unsupported4bit, match="packed bytes"):  # checked as from_bnb checks it
        Packed4bit.of(q[:-1], state)
