"""Argument checks of the 4-bit LoRA op and module: errors that name the argument, before any kernel runs.

The Triton kernels take their sizes from the 4-bit weight, so a mismatched B or bias used to be read out of bounds
there; those cases also run on the Triton backend (Triton's interpreter on CPU: the checks fire before any launch).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from test_nf4_dequant import eager_bitsandbytes  # noqa: E402, F401  (autouse fixture)

from lamelm_fast.ops import LoRALinear4bit, lora_nf4_linear  # noqa: E402
from lamelm_fast.ops.dispatch import use_backend  # noqa: E402

IN, OUT, R = 64, 48, 4


@pytest.fixture(scope="module")
def layer() -> LoRALinear4bit:
    torch.manual_seed(0)
    return LoRALinear4bit.from_linear(nn.Linear(IN, OUT), R)


def call(layer: LoRALinear4bit, **overrides: Any) -> torch.Tensor:
    """lora_nf4_linear on the layer's tensors, with some of them replaced."""
    weight = layer.base_layer.weight
    args = {"x": torch.randn(2, 3, IN), "A": layer.lora_A.weight, "B": layer.lora_B.weight,
            "bias": layer.base_layer.bias} | overrides
    return lora_nf4_linear(args["x"], weight, weight.quant_state, args["A"], args["B"], 2.0, bias=args["bias"])


# (replaced arguments, error type, message fragment): the fragment names the argument and the expected shape.
OUT_OF_BOUNDS = {
    "B-rows": ({"B": torch.randn(OUT - 8, R)}, ValueError, rf"B has shape \[{OUT - 8}, {R}\], expected \[{OUT}, {R}\]"),
    "B-rank": ({"B": torch.randn(OUT, R - 2)}, ValueError, rf"B has shape \[{OUT}, {R - 2}\], expected \[{OUT}, {R}\]"),
    "bias": ({"bias": torch.randn(7)}, ValueError, rf"bias has shape \[7\], expected \[{OUT}\]"),
}
OTHER = {
    "x-int": ({"x": torch.ones(2, IN, dtype=torch.long)}, TypeError, "x has dtype torch.int64"),
    "x-in": ({"x": torch.randn(2, IN - 1)}, ValueError, rf"x has shape \[2, {IN - 1}\].*in_features = {IN}"),
    "x-0d": ({"x": torch.tensor(1.0)}, ValueError, r"x has shape \[\]"),
    "A-in": ({"A": torch.randn(R, IN // 2)}, ValueError, rf"A has shape \[{R}, {IN // 2}\], expected \[r, {IN}\]"),
    "A-1d": ({"A": torch.randn(IN)}, ValueError, rf"A has shape \[{IN}\]"),
    "A-int": ({"A": torch.ones(R, IN, dtype=torch.int32)}, TypeError, "A has dtype torch.int32"),
    "bias-2d": ({"bias": torch.randn(1, OUT)}, ValueError, rf"bias has shape \[1, {OUT}\]"),
    "B-device": ({"B": torch.randn(OUT, R, device="meta")}, ValueError, "B is on meta but x is on cpu"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", OUT_OF_BOUNDS.values(), ids=OUT_OF_BOUNDS.keys())
def test_mismatched_adapter_or_bias_is_refused(layer: LoRALinear4bit, case: tuple, backend: str) -> None:
    overrides, error, message = case
    with use_backend(backend), pytest.raises(error, match=message):
        call(layer, **overrides)


@pytest.mark.parametrize("case", OTHER.values(), ids=OTHER.keys())
def test_bad_input_is_refused_with_the_argument_named(layer: LoRALinear4bit, case: tuple) -> None:
    overrides, error, message = case
    with use_backend("torch"), pytest.raises(error, match=message):
        call(layer, **overrides)


def test_valid_call_without_bias_passes_the_checks(layer: LoRALinear4bit) -> None:
    with use_backend("torch"):
        assert call(layer, bias=None).shape == (2, 3, OUT)


def test_module_checks_its_input(layer: LoRALinear4bit) -> None:
    with use_backend("torch"), pytest.raises(ValueError, match=rf"x has shape \[5, {IN + 1}\]"):
        layer(torch.randn(5, IN + 1))


def test_dense_base_layer_points_to_from_linear() -> None:
    with pytest.raises(TypeError, match=r"bitsandbytes Linear4bit base layer, got torch\.nn.*from_linear"):
        LoRALinear4bit(nn.Linear(IN, OUT), R)


def test_unquantized_base_layer_says_to_move_it() -> None:
    base = bnb.nn.Linear4bit(IN, OUT)  # bitsandbytes quantizes on .to(device), not at construction
    with pytest.raises(ValueError, match=r"not quantized yet.*base_layer\.to\(device\)"):
        LoRALinear4bit(base, R)
