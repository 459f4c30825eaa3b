"""The two 4-bit matmul strategies (fused Triton GEMM, dequantize + cuBLAS), the LAMELM_NF4_MATMUL setting and the
``auto`` choice: same numbers from both strategies (kernel, layer vs PEFT), timing only where it means something,
one measurement per shape."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from test_lora4bit import CASES, _Holder, assert_same, peft_layer, rel_err, run  # noqa: E402
from test_nf4_dequant import _quantized, eager_bitsandbytes  # noqa: E402, F401  (autouse fixture)

from conftest import count_calls  # noqa: E402
from lamelm_fast.kernels import nf4_lora  # noqa: E402
from lamelm_fast.ops import dispatch, lora_nf4_linear, nf4_matmul  # noqa: E402
from lamelm_fast.ops.dispatch import use_backend, use_nf4_matmul  # noqa: E402
from lamelm_fast.ops.lora4bit import patch_peft_lora4bit  # noqa: E402
from lamelm_fast.ops.quant4bit import Packed4bit, dequantize_reference  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_cache():
    nf4_matmul.CACHE.clear()
    yield
    nf4_matmul.CACHE.clear()


# ------------------------------------------------------------------------------------------------- the setting


def test_a_bad_setting_fails_the_op_on_every_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked at each call, also where the setting does not apply (the torch reference), so a typo never waits
    for the GPU run to surface."""
    layer = peft_layer(64, 24)
    base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
    monkeypatch.setenv(dispatch.NF4_MATMUL_ENV_VAR, "Dequant")
    for backend in ("torch", "triton"):
        with use_backend(backend), pytest.raises(ValueError, match="LAMELM_NF4_MATMUL"):
            lora_nf4_linear(torch.randn(3, 64), base.weight, base.weight.quant_state, a.weight, b.weight, 2.0)


# ------------------------------------------------------------------------------------------------- the kernels


def _weight(out_features: int, in_features: int, blocksize: int, quant_type: str = "nf4",
            nested: bool = True) -> Packed4bit:
    q, state = _quantized((out_features, in_features), quant_type, nested, blocksize, seed=out_features)
    return Packed4bit.from_bnb(q, state)


def _expected(a: torch.Tensor, w: Packed4bit, weight_transposed: bool, lora, scale: float, bias, start):
    """The exact sum in float64 (the weight as a's dtype rounds it, which both strategies share)."""
    weight = dequantize_reference(w, a.dtype).double()
    result = a.double() @ (weight.t() if weight_transposed else weight)
    if lora is not None:
        result += scale * lora[0].double() @ lora[1].double()
    if bias is not None:
        result += bias.double()
    if start is not None:
        result += start.double()
    return result


# (M, in, out, blocksize, quant_type, nested): odd sizes, blocks straddling rows, the GEMV row counts; reductions
# shorter and longer than the result rows (the two LoRA placements of the dequant path's byte rule).
SHAPES = [(37, 70, 45, 64, "nf4", True), (3, 64, 33, 32, "fp4", False), (20, 128, 40, 128, "nf4", False)]
# (a, compute, out, adapter) dtypes: fp32; fp16 with fp32 adapters; an fp32 output; fp32 activations computed in
# fp16 (as the trainer runs QLoRA: fp32 activations, bf16 autocast; the interpreter's bf16 dot is not usable).
DTYPES = {"fp32": (torch.float32, torch.float32, torch.float32, torch.float32),
          "fp16": (torch.float16, torch.float16, torch.float16, torch.float32),
          "fp16-fp32out": (torch.float16, torch.float16, torch.float32, torch.float16),
          "fp32in-fp16": (torch.float32, torch.float16, torch.float32, torch.float32)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-{s[1]}x{s[2]}-{s[4]}-bs{s[3]}")
@pytest.mark.parametrize("weight_transposed", [True, False], ids=["forward", "input_grad"])
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
def test_dequant_strategy_equals_fused_and_the_exact_sum(shape: tuple, weight_transposed: bool, dtypes: str,
                                                         accumulate: bool) -> None:
    in_dtype, dtype, out_dtype, lora_dtype = DTYPES[dtypes]
    M, in_features, out_features, blocksize, quant_type, nested = shape
    w = _weight(out_features, in_features, blocksize, quant_type, nested)
    inner, outer = (in_features, out_features) if weight_transposed else (out_features, in_features)
    gen = torch.Generator().manual_seed(M + inner)
    a = torch.randn(M, inner, generator=gen).to(in_dtype)
    rank, scale = 5, 1.7
    left = torch.randn(M, rank, generator=gen).to(lora_dtype)
    right = torch.randn(outer, rank, generator=gen).to(lora_dtype).t()  # strided, as the forward passes B^T
    bias = torch.randn(outer, generator=gen) if weight_transposed else None  # the forward's only
    start = torch.randn(M, outer, generator=gen).to(out_dtype) if accumulate else None
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    expected = _expected(a.to(dtype), w, weight_transposed, (left, right), scale, bias, start)
    args = {"weight_transposed": weight_transposed, "lora": (left, right), "scale": scale, "bias": bias,
            "accumulate": accumulate}
    runs = {name: lambda out, name=name: nf4_matmul.matmul_4bit_lora(a, w, strategy=name, dtype=dtype, **args,
                                                                    out=out)
            for name in nf4_matmul.STRATEGIES}
    for placement in ("concat", "addmm"):
        runs[placement] = lambda out, placement=placement: nf4_lora.dequant_matmul_4bit_lora(
            a, w, dtype=dtype, **args, out=out, placement=placement)
    results = {}
    for name, launch in runs.items():
        # Overwriting must ignore what out held (NaN here); accumulating adds onto it.
        out = start.clone() if accumulate else torch.full((M, outer), float("nan"), dtype=out_dtype)
        assert launch(out) is out and out.dtype == out_dtype
        assert rel_err(out.double(), expected) < tol, name
        results[name] = out
    for name in results:
        assert rel_err(results[name].double(), results["fused"].double()) < tol, name


def test_concatenated_operand_without_padding() -> None:
    """A reduction plus LoRA rank that fills whole 16-byte rows (59 + 5 = 64): the operand is written in one op with
    no zero columns, in both directions."""
    w = _weight(45, 59, 64)
    for weight_transposed, inner, outer in ((True, 59, 45), (False, 45, 59)):
        rank = 64 - inner if weight_transposed else 3  # input gradient: 45 + 3 = 48, also whole rows
        a, left, right = torch.randn(13, inner), torch.randn(13, rank), torch.randn(rank, outer)
        ours = nf4_lora.dequant_matmul_4bit_lora(a, w, weight_transposed=weight_transposed, lora=(left, right),
                                                 scale=0.7, placement="concat")
        assert rel_err(ours.double(), _expected(a, w, weight_transposed, (left, right), 0.7, None, None)) < 1e-5


@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                   (torch.float16, torch.float16)])
def test_summed_input_gradient_of_projections_sharing_their_input(dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """q/k/v's input gradient as one GEMM: the float64 sum of every term's ``a @ W + scale * left @ right``, with a
    term without LoRA, odd sizes (the reduction padded to whole 16-byte rows) and strided operands."""
    q_in = 57
    weights = [_weight(45, q_in, 64), _weight(21, q_in, 32, "fp4", nested=False), _weight(19, q_in, 64)]
    terms, expected = [], 0.0
    for i, w in enumerate(weights):
        a = torch.randn(w.shape[0], 13).t().to(dtype)  # [13, P_i], column-major
        lora = None if i == 1 else (torch.randn(13, 5).to(dtype), torch.randn(5, q_in).to(dtype))
        scale = 0.7 + i
        terms.append((a, w, lora, scale))
        # The weight and the scaled right factor are rounded to the compute dtype, as the operand buffer holds them.
        weight = dequantize_reference(w, dtype).double()
        expected = expected + a.double() @ weight
        if lora is not None:
            expected = expected + lora[0].double() @ (lora[1].double() * scale).to(dtype).double()
    out = torch.full((13, q_in), float("nan"), dtype=out_dtype)
    assert nf4_lora.dequant_matmul_4bit_lora_sum(terms, dtype=dtype, out=out) is out
    assert rel_err(out.double(), expected) < (1e-5 if dtype == torch.float32 else 2e-3)
    with pytest.raises(ValueError, match="does not fit out"):
        nf4_lora.dequant_matmul_4bit_lora_sum(terms, dtype=dtype, out=torch.empty(13, q_in + 1, dtype=out_dtype))


def test_dequant_strategy_without_lora_or_out() -> None:
    w = _weight(45, 70, 64)
    a = torch.randn(11, 70)
    for weight_transposed, x in ((True, a), (False, torch.randn(11, 45))):
        for bias in (None, torch.randn(45)) if weight_transposed else (None,):
            for placement in ("concat", "addmm", None):
                ours = nf4_lora.dequant_matmul_4bit_lora(x, w, weight_transposed=weight_transposed, bias=bias,
                                                         placement=placement)
                assert ours.dtype == x.dtype and ours.is_contiguous()
                assert rel_err(ours.double(), _expected(x, w, weight_transposed, None, 1.0, bias, None)) < 1e-5
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        nf4_lora.dequant_matmul_4bit_lora(a, w, accumulate=True)
    with pytest.raises(ValueError, match=r"out is \[11, 44\]"):
        nf4_lora.dequant_matmul_4bit_lora(a, w, out=torch.empty(11, 44))
    with pytest.raises(ValueError, match="placement"):
        nf4_lora.dequant_matmul_4bit_lora(a, w, placement="fused")


def test_lora_placement_follows_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Concatenated into the GEMM when a is cast anyway or its rows are shorter than the result's; a LoRA product
    first (two more passes over the result) otherwise; a bare product is a bare GEMM."""
    concatenated = []
    concat = nf4_lora._concatenated
    monkeypatch.setattr(nf4_lora, "_concatenated", lambda *a, **k: concatenated.append(1) or concat(*a, **k))
    w = _weight(45, 70, 64)  # forward: reduction 70 > 45 result columns; input gradient: 45 < 70
    lora = {True: (torch.randn(6, 4), torch.randn(4, 45)), False: (torch.randn(6, 4), torch.randn(4, 70))}
    for weight_transposed, in_dtype, with_lora, expected in [(True, torch.float16, True, 0),
                                                             (False, torch.float16, True, 1),
                                                             (True, torch.float32, True, 1),
                                                             (False, torch.float32, False, 0)]:
        concatenated.clear()
        a = torch.randn(6, 70 if weight_transposed else 45).to(in_dtype)
        nf4_lora.dequant_matmul_4bit_lora(a, w, dtype=torch.float16, weight_transposed=weight_transposed,
                                          lora=lora[weight_transposed] if with_lora else None)
        assert len(concatenated) == expected, (weight_transposed, in_dtype, with_lora)


# ------------------------------------------------------------------------------------------------- the layers


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[3]}-bs{c[2]}-M{c[6]}")
def test_patched_layer_with_dequant_equals_peft_and_fused(case: tuple, launches: dict[str, int],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    in_f, out_f, blocksize, quant_type, nested, bias, lead = case
    ref_layer = peft_layer(in_f, out_f, bias=bias, quant_type=quant_type, nested=nested, blocksize=blocksize)
    layer = copy.deepcopy(ref_layer)
    assert patch_peft_lora4bit(_Holder(layer)) == 1
    torch.manual_seed(2)
    x, grad_out = torch.randn(*lead, in_f), torch.randn(*lead, out_f)
    monkeypatch.setenv(dispatch.NF4_MATMUL_ENV_VAR, "dequant")
    with use_backend("triton"):
        ours = run(layer, x, grad_out)
        assert launches == {"fused": 0, "dequant": 2}  # forward and input gradient
        with use_nf4_matmul("fused"):
            fused = run(layer, x, grad_out)
    assert_same(ours, run(ref_layer, x, grad_out))
    assert_same(ours, fused)


def test_dequant_with_dropout_equals_peft(launches: dict[str, int]) -> None:
    ref_layer = peft_layer(64, 40, dropout=0.3)
    layer = copy.deepcopy(ref_layer)
    patch_peft_lora4bit(_Holder(layer))
    torch.manual_seed(3)
    x, grad_out = torch.randn(20, 64), torch.randn(20, 40)
    with use_backend("triton"), use_nf4_matmul("dequant"):
        ours = run(layer, x, grad_out, seed=7)
    assert launches == {"fused": 0, "dequant": 2}
    assert_same(ours, run(ref_layer, x, grad_out, seed=7))


def test_backward_keeps_the_forwards_strategy(launches: dict[str, int]) -> None:
    """The strategy is read once per op call, like the backend: a backward outside the ``with`` runs as its
    forward did."""
    layer = peft_layer(64, 40)
    patch_peft_lora4bit(_Holder(layer))
    x = torch.randn(6, 64, requires_grad=True)
    with use_backend("triton"), use_nf4_matmul("dequant"):
        y = layer(x)
    y.sum().backward()
    assert launches == {"fused": 0, "dequant": 2}


class Attention4bit(torch.nn.Module):
    """q, k and v: 4-bit projections of one input, for PEFT to put adapters on."""

    is_loaded_in_4bit = True

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (peft_layer(64, n, seed=n).get_base_layer() for n in (48, 32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).sum(-1) * self.k_proj(x).mean(-1) + self.v_proj(x).square().sum(-1)


def attention_with_lora(dropout: float = 0.0) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"])
    return inject_adapter_in_model(config, Attention4bit())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_qkv_group_input_gradient_with_dequant(launches: dict[str, int], monkeypatch: pytest.MonkeyPatch,
                                               dropout: float) -> None:
    """On the dequant path the q/k/v input gradient is one GEMM over the three projections; with dropout (whose
    masks multiply each LoRA term apart) k and v add theirs into q's buffer (ACCUMULATE)."""
    from torch import nn

    summed = count_calls(monkeypatch, nf4_lora, {"one GEMM": "dequant_matmul_4bit_lora_sum"})
    torch.manual_seed(8)
    ref = attention_with_lora(dropout)
    for name, param in ref.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)
    ours = copy.deepcopy(ref)
    assert patch_peft_lora4bit(ours) == 3
    x = torch.randn(2, 5, 64)

    def grads(model: nn.Module) -> dict[str, torch.Tensor]:
        inp = x.clone().requires_grad_(True)
        model(inp).sum().backward()
        found = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return {**found, "x": inp.grad}

    torch.manual_seed(9)
    with use_backend("triton"), use_nf4_matmul("dequant"):
        got = grads(ours)
    assert launches == {"fused": 0, "dequant": 3 if dropout == 0.0 else 6}
    assert summed == {"one GEMM": int(dropout == 0.0)}
    torch.manual_seed(9)  # the same dropout masks
    expected = grads(ref)
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel_err(got[name], expected[name]) < 1e-5, name


def test_projections_of_one_input_share_its_cast_on_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast (fp32 input, 16-bit compute) q, k and v read one cast of their input in their fused forward
    kernels, not one cast each."""
    model = attention_with_lora()
    assert patch_peft_lora4bit(model) == 3
    operands: list[torch.Tensor] = []
    kernel = nf4_lora.matmul_4bit_lora

    def spy(a, *args, **kwargs):
        if kwargs.get("weight_transposed", True):  # the forward products
            operands.append(a)
        return kernel(a, *args, **kwargs)

    monkeypatch.setattr(nf4_lora, "matmul_4bit_lora", spy)
    x = torch.randn(2, 5, 64)
    with use_backend("triton"), use_nf4_matmul("fused"), torch.autocast("cpu", dtype=torch.float16):
        model(x).float().sum().backward()
    assert len(operands) == 3 and all(a.dtype == torch.float16 for a in operands)
    assert len({a.data_ptr() for a in operands}) == 1


# ------------------------------------------------------------------------------------------------- auto


def test_auto_does_not_time_under_the_interpreter(launches: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_timing(*args, **kwargs):
        raise AssertionError("auto timed strategies on CPU")

    monkeypatch.setattr(nf4_matmul, "time_strategies", no_timing)
    layer = peft_layer(64, 40)
    patch_peft_lora4bit(_Holder(layer))
    monkeypatch.delenv(dispatch.NF4_MATMUL_ENV_VAR, raising=False)
    with use_backend("triton"):
        run(layer, torch.randn(300, 64), torch.randn(300, 40))
    assert launches == {"fused": 2, "dequant": 0}
    assert len(nf4_matmul.CACHE) == 0


def test_auto_takes_dequant_untimed_from_the_row_threshold(launches: dict[str, int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Training shapes (DEQUANT_FROM_ROWS rows and more) go to dequant without a trial, also where auto could time;
    one row fewer still follows the timing rule (here, off CUDA: fused)."""
    monkeypatch.setattr(nf4_matmul, "_can_time", lambda a: True)
    monkeypatch.setattr(nf4_matmul, "time_strategies", lambda *a, **k: pytest.fail("timed a training shape"))
    assert nf4_matmul.DEQUANT_FROM_ROWS == 2048  # the H100's measured crossover; a small one keeps the interpreter fast
    rows = 37
    monkeypatch.setattr(nf4_matmul, "DEQUANT_FROM_ROWS", rows)
    w = _weight(24, 64, 64)
    a = torch.randn(rows, 64)
    with use_backend("triton"):
        out = nf4_matmul.matmul_4bit_lora(a, w, strategy="auto")
    assert launches == {"fused": 0, "dequant": 1} and len(nf4_matmul.CACHE) == 0
    assert rel_err(out.double(), _expected(a, w, True, None, 1.0, None, None)) < 1e-5
    monkeypatch.setattr(nf4_matmul, "_can_time", lambda a: False)
    with use_backend("triton"):
        nf4_matmul.matmul_4bit_lora(a[: rows - 1], w, strategy="auto")
    assert launches == {"fused": 1, "dequant": 1}


def test_auto_takes_the_gemv_untimed_when_decoding(launches: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to GEMV_MAX_ROWS rows auto takes the fused strategy (its GEMV) without a trial, also where it could time:
    timing calls that take microseconds of GPU work measures the host, and a noisy win for dequant would keep a
    dequantized copy of the weight per call. One row more is left to the trial."""
    monkeypatch.setattr(nf4_matmul, "_can_time", lambda a: True)
    monkeypatch.setattr(nf4_matmul, "time_strategies", lambda *a, **k: pytest.fail("timed a decoding shape"))
    w = _weight(24, 64, 64)
    rows = nf4_lora.GEMV_MAX_ROWS
    a = torch.randn(rows, 64)
    with use_backend("triton"):
        out = nf4_matmul.matmul_4bit_lora(a, w, strategy="auto")
    assert launches == {"fused": 1, "dequant": 0} and len(nf4_matmul.CACHE) == 0
    assert rel_err(out.double(), _expected(a, w, True, None, 1.0, None, None)) < 1e-5
    assert [nf4_matmul.settled_strategy("auto", n) for n in (1, rows, rows + 1)] == ["fused", "fused", "auto"]
    assert nf4_matmul.settled_strategy("dequant", 1) == "dequant"  # a pinned strategy is kept


def test_faster_keeps_fused_unless_dequant_wins_by_the_margin() -> None:
    margin = nf4_matmul.DEQUANT_MARGIN
    assert nf4_matmul.faster({"fused": 1.0, "dequant": 0.5}) == "dequant"
    assert nf4_matmul.faster({"fused": 1.0, "dequant": 1.0 - 2 * margin}) == "dequant"
    assert nf4_matmul.faster({"fused": 1.0, "dequant": 1.0 - margin / 2}) == "fused"  # within noise: less memory
    assert nf4_matmul.faster({"fused": 1.0, "dequant": 1.5}) == "fused"
    assert nf4_matmul.faster({"fused": 1.0, "dequant": float("inf")}) == "fused"  # dequant ran out of memory
    assert nf4_matmul.faster({"fused": float("inf"), "dequant": 3.0}) == "dequant"


def test_shape_keys_bucket_rows_and_separate_what_changes_the_speed() -> None:
    w = _weight(45, 70, 64)

    def key(M: int, weight_transposed: bool = True, **kwargs) -> nf4_matmul.ShapeKey:
        a = torch.empty(M, 70 if weight_transposed else 45, dtype=kwargs.pop("in_dtype", torch.float32))
        options = {"dtype": torch.float32, "out": None, "accumulate": False, "lora": True, **kwargs}
        return nf4_matmul.shape_key(a, w, weight_transposed=weight_transposed, **options)

    assert key(300) == key(512) != key(513)
    assert key(513).m_bucket == 1024 and key(1).m_bucket == 1 and key(3).m_bucket == 4
    assert (key(300).p, key(300).q) == (45, 70) and (key(300, False).p, key(300, False).q) == (70, 45)
    assert len({key(300), key(300, False), key(300, dtype=torch.float16), key(300, in_dtype=torch.float16),
                key(300, lora=False), key(300, out=torch.empty(300, 45, dtype=torch.float16)),
                key(300, out=torch.empty(300, 45), accumulate=True)}) == 7


def test_cache_measures_each_shape_once_and_logs_the_decision(caplog: pytest.LogCaptureFixture) -> None:
    w = _weight(45, 70, 64)
    cache = nf4_matmul.StrategyCache()
    measured: list[int] = []

    def measure_as(timings: dict[str, float], M: int):
        def measure() -> dict[str, float]:
            measured.append(M)
            return timings

        return measure

    def key(M: int) -> nf4_matmul.ShapeKey:
        return nf4_matmul.shape_key(torch.empty(M, 70), w, dtype=torch.float32, weight_transposed=True, out=None,
                                    accumulate=False, lora=True)

    slow_dequant, fast_dequant = {"fused": 1.0, "dequant": 2.0}, {"fused": 2.0, "dequant": 1.0}
    with caplog.at_level(logging.DEBUG, logger="lamelm_fast.ops.nf4_matmul"):
        assert cache.choose(key(100), measure_as(slow_dequant, 100)) == "fused"
    assert "fused 1.000 ms, dequant 2.000 ms -> fused" in caplog.text
    # Same bucket: the cached decision, whatever a new measurement would say.
    assert cache.choose(key(128), measure_as(fast_dequant, 128)) == "fused"
    assert cache.choose(key(4096), measure_as(fast_dequant, 4096)) == "dequant"
    assert cache.choose(key(3000), measure_as(slow_dequant, 3000)) == "dequant"
    assert measured == [100, 4096] and len(cache) == 2
    assert cache.get(key(65)) == "fused" and cache.get(key(64)) is None
    cache.clear()
    assert cache.choose(key(128), measure_as(fast_dequant, 128)) == "dequant"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("in_features", "out_features"), [(2048, 8192), (8192, 2048), (2048, 512)])
def test_auto_on_real_shapes_matches_fused_and_leaves_live_outputs_alone(in_features: int, out_features: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The first auto call of a shape times both strategies on scratch outputs: the live output gets exactly one
    result (accumulated once onto what it held), equal to the fused one; the next call of the shape measures
    nothing; the dequant path keeps no buffer once it returns. bf16 compute from bf16 or fp32 activations (the
    trainer's: fp32 results written by cuBLAS directly), overwriting and accumulating."""
    torch.manual_seed(0)
    M, rank = 1024, 16  # under DEQUANT_FROM_ROWS: auto times these
    q, state = bnb.functional.quantize_4bit(torch.randn(out_features, in_features, device="cuda") / 30,
                                            blocksize=64, compress_statistics=True, quant_type="nf4")
    w = Packed4bit.from_bnb(q, state)
    combos = [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True)]
    for weight_transposed, inner, outer in ((True, in_features, out_features), (False, out_features, in_features)):
        lora = (torch.randn(M, rank, device="cuda", dtype=torch.bfloat16) / 4,
                torch.randn(rank, outer, device="cuda", dtype=torch.bfloat16) / 4)
        for activations, accumulate in combos:
            a = torch.randn(M, inner, device="cuda", dtype=activations)
            start = torch.randn(M, outer, device="cuda", dtype=activations)
            got = {}
            for strategy in ("fused", "auto", "dequant"):
                out = start.clone() if accumulate else torch.full_like(start, float("nan"))
                before = torch.cuda.memory_allocated()
                nf4_matmul.matmul_4bit_lora(a, w, strategy=strategy, dtype=torch.bfloat16,
                                            weight_transposed=weight_transposed, lora=lora, scale=2.0, out=out,
                                            accumulate=accumulate)
                if strategy == "dequant":
                    assert torch.cuda.memory_allocated() == before  # no weight or operand buffer kept
                got[strategy] = out.float() - start.float() if accumulate else out.float()
            for strategy in ("auto", "dequant"):
                # One accumulation, not several: the difference to fused is rounding, far below one product.
                assert rel_err(got[strategy], got["fused"]) < 1e-2, (strategy, weight_transposed, activations)
    assert len(nf4_matmul.CACHE) == 2 * len(combos)
    monkeypatch.setattr(nf4_matmul, "time_strategies", lambda *a, **k: pytest.fail("measured a cached shape"))
    rows = 700  # the bucket of 1024
    a = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    lora = (torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16),
            torch.randn(rank, out_features, device="cuda", dtype=torch.bfloat16))
    out = torch.zeros(rows, out_features, device="cuda", dtype=torch.bfloat16)
    nf4_matmul.matmul_4bit_lora(a, w, strategy="auto", lora=lora, out=out, accumulate=True)
    assert len(nf4_matmul.CACHE) == 2 * len(combos)
