"""torch.compile over a model patched by apply_kernels: the compiled model's loss and every gradient equal the same
patched model's in eager, call after call (new tokens, new shapes, packed rows with new boundaries, train and eval),
in one graph with one deliberate break, at the loss, however deep the model.

How the ops meet the compiler: RMSNorm, SwiGLU and RoPE trace their torch formulas (inductor fuses them); the
4-bit LoRA ops run as custom ops (opaque: what runs and what backward keeps are eager's); the fused cross-entropy is
one deliberate graph break. On CPU the tests compile with ``aot_eager`` (dynamo's graphs and AOT autograd's
forward/backward split, where every problem above showed; inductor's C++ build would take minutes of CI's 2 cores).

On a GPU (``-m gpu``; bench/gpu_run.sh's ``compile-tests`` stage) the same tests run as the trainer runs there: inductor
and its Triton kernels, fp32 weights under bf16 autocast, the Triton backend of our ops, torch's varlen flash kernel
for packed rows (counted where it runs); plus the custom ops' opcheck on CUDA tensors and CUDA graphs
(``mode="reduce-overhead"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import rel_err, tiny_llama_config
from lamelm_fast import apply_kernels
from lamelm_fast.ops.dispatch import use_backend

pytestmark = pytest.mark.slow
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 97
LAYERS = 2


@dataclass(frozen=True)
class Setting:
    """Where a test compiles and how close compiled must come to eager there."""

    device: str
    backend: str
    loss_tolerance: float
    grad_tolerance: float
    config: dict[str, int] = field(default_factory=dict)  # tiny_llama_config overrides

    def autocast(self) -> AbstractContextManager[None]:
        """bf16 autocast on a GPU (the trainer's fp32 weights under bf16); fp32 on CPU."""
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")

    def on_device(self, inputs: dict[str, object]) -> dict[str, object]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# CPU: aot_eager in fp32, equal to fp32 rounding. GPU: inductor's kernels under bf16 autocast, which round where eager
# does not (a fused norm keeps fp32 between what eager rounds to bf16 op by op): equal to bf16 rounding. The GPU
# model's widths are multiples of no block size (head size 24 still lets flash attention run).
CPU = Setting("cpu", "aot_eager", 1e-5, 1e-5)
GPU = Setting("cuda", "inductor", 1e-2, 3e-2, {"hidden_size": 96, "intermediate_size": 200})
SETTINGS = [pytest.param(CPU, id="cpu"), pytest.param(GPU, id="cuda", marks=ON_GPU)]


@pytest.fixture(autouse=True)
def fresh_compiler() -> Iterator[None]:
    """Compiled from scratch: inductor's on-disk caches key a graph by its code, not by the custom ops' registration
    (a cached partition of an older op's graph would be reused), and each test starts with no compiled frame."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


def llama(layers: int = LAYERS, setting: Setting = CPU) -> torch.nn.Module:
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(VOCAB, num_hidden_layers=layers, **setting.config)).to(
        setting.device).train()


def batch(shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, shape, generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100  # a prompt without loss
    return {"input_ids": input_ids, "labels": labels}


def packed(lengths: list[int], seed: int, flash_kwargs: bool = True) -> dict[str, torch.Tensor]:
    """One packed row as HF's DataCollatorWithFlattening makes it: positions restarting at each sequence, the first
    token of each without loss, and (``flash_kwargs``) the padding-free arguments."""
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(seed)
    features = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in lengths]
    return dict(DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features, return_tensors="pt"))


def loss_and_grads(model: torch.nn.Module, call: Callable[..., object], inputs: dict[str, torch.Tensor],
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``call(**inputs)``'s loss and the gradients it leaves on ``model``'s parameters (``call`` is the model or its
    compiled form, which shares them)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same LoRA dropout masks for both
    loss = call(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_compiled_equals_eager(model: torch.nn.Module, compiled: Callable[..., object],
                                 inputs: dict[str, torch.Tensor], setting: Setting = CPU) -> None:
    inputs = setting.on_device(inputs)
    with setting.autocast():
        loss, grads = loss_and_grads(model, compiled, inputs)
        want_loss, want_grads = loss_and_grads(model, model, inputs)
    assert rel_err(loss, want_loss) < setting.loss_tolerance, (loss, want_loss)
    assert grads.keys() == want_grads.keys() and want_grads
    for name, grad in grads.items():
        assert rel_err(grad, want_grads[name]) < setting.grad_tolerance, name


def compile_model(model: torch.nn.Module, backend: str = "aot_eager") -> torch.nn.Module:
    return torch.compile(model, backend=backend)


def step_events(model: torch.nn.Module, call: Callable[..., object], inputs: dict[str, torch.Tensor],
                setting: Setting, names: tuple[str, ...]) -> dict[str, int]:
    """How many profiler events of each name (an op's, or a CUDA runtime call's) one training step of ``call``
    records. The profiler sees an op run inside a compiled graph; a Python counter wrapped around the op would be
    traced into the graph instead, and recompile it for every new count. Call it after a step on the same inputs has
    compiled what it runs: tracing calls the ops too, on fake tensors."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if setting.device == "cuda" else [])]
    with setting.autocast(), profile(activities=activities) as profiled:
        loss_and_grads(model, call, setting.on_device(inputs))
    return {name: sum(event.name == name for event in profiled.events()) for name in names}


@pytest.mark.parametrize("setting", SETTINGS)
def test_patched_llama_compiled_equals_eager_across_calls(setting: Setting) -> None:
    """The fused loss, RMSNorm, SwiGLU and RoPE: new tokens, new shapes, HF Trainer's ``num_items_in_batch`` given
    and not, an evaluation in between (the model's own loss, no gradients) and training again. (On the Triton
    backend the compiled graph is the same: RMSNorm, SwiGLU and RoPE trace their formulas, the loss is eager.)"""
    model = llama(setting=setting)
    report = apply_kernels(model)
    assert report.cross_entropy and report.rms_norms == 5 and report.swiglu_mlps == 2 and report.rope_attentions == 2
    compiled = compile_model(model, setting.backend)
    assert_compiled_equals_eager(model, compiled, batch((2, 13), seed=0), setting)
    assert_compiled_equals_eager(model, compiled, batch((2, 13), seed=1), setting)
    assert_compiled_equals_eager(model, compiled, {**batch((3, 7), seed=2), "num_items_in_batch": torch.tensor(9)},
                                 setting)
    model.eval()
    with torch.no_grad(), setting.autocast():
        inputs = setting.on_device(batch((2, 13), seed=3))
        got, want = compiled(**inputs), model(**inputs)
        assert rel_err(got.loss, want.loss) < setting.loss_tolerance
        assert rel_err(got.logits, want.logits) < setting.loss_tolerance
    model.train()
    assert_compiled_equals_eager(model, compiled, batch((2, 13), seed=4), setting)


VARLEN_OPS = ("torch_attn::_varlen_attn", "torch_attn::_varlen_attn_backward")  # what flash_varlen_attention runs


@pytest.mark.parametrize("setting", SETTINGS)
def test_packed_rows_compiled_equals_eager(setting: Setting) -> None:
    """Packed rows with new sequence boundaries at every call (one shape: a mask kept from an earlier call would
    attend across sequences), with the padding-free arguments and with positions alone. Where flash attention runs
    (a GPU, bf16) the padding-free calls take the varlen path compiled too: torch's varlen kernel, forward and
    backward, in every layer; elsewhere (CPU, or positions alone) sdpa over the block-diagonal mask."""
    model = llama(setting=setting)
    apply_kernels(model)
    compiled = compile_model(model, setting.backend)
    first = packed([7, 9, 4], seed=0)
    with torch.no_grad():  # the test has teeth: attention across the packed sequences changes the loss
        inputs = setting.on_device(first)
        across = model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss
        assert rel_err(across, model(**inputs).loss) > 1e-4  # (the CPU tolerance below is 1e-5)
    varlen = LAYERS if setting.device == "cuda" else 0
    for inputs, runs in ((first, varlen), (packed([3, 12, 5], seed=1), varlen),
                         (packed([5, 6, 4, 8], seed=2, flash_kwargs=False), 0)):
        assert_compiled_equals_eager(model, compiled, inputs, setting)
        assert step_events(model, compiled, inputs, setting, VARLEN_OPS) == dict.fromkeys(VARLEN_OPS, runs)


def test_hf_trainer_with_torch_compile_trains_as_without(tmp_path: Path) -> None:
    """``TrainingArguments(torch_compile=True)`` over a patched model, on packed rows (DataCollatorWithFlattening,
    new sequence boundaries at every step; the Trainer passes ``num_items_in_batch``): the same losses and weights as
    without."""
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    rows = Dataset.from_dict({"input_ids": [torch.randint(1, VOCAB, (n,), generator=generator).tolist()
                                            for n in (5, 9, 7, 7, 10, 4)]})
    runs = []
    for compiled in (False, True):
        model = llama()
        apply_kernels(model)
        args = TrainingArguments(str(tmp_path / str(compiled)), max_steps=3,
                                 per_device_train_batch_size=2, learning_rate=1e-2, optim="sgd", logging_steps=1,
                                 train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True,
                                 # (a backend named turns compiling on: name it only then)
                                 **({"torch_compile_backend": "aot_eager"} if compiled else {}))
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True))
        torch._dynamo.utils.counters.clear()
        trainer.train()
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compiled  # it did compile
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (losses, weights), (compiled_losses, compiled_weights) = runs
    assert len(losses) == 3 and compiled_losses == pytest.approx(losses, rel=1e-5)
    for name, weight in weights.items():
        assert rel_err(compiled_weights[name], weight) < 1e-6, name


def one_graph_and_the_loss(explanation: object) -> bool:
    """dynamo's explanation shows the whole model in one graph and one break, the deliberate one at the fused loss
    (which it leaves to eager: see lamelm_fast.patching.lm_head_loss)."""
    reasons = [reason.user_stack[-1] for reason in explanation.break_reasons]
    return (explanation.graph_count == 1 and len(reasons) == 1
            and reasons[0].filename.endswith("patching.py") and "lm_head_loss" in reasons[0].line)


def compiled_in_one_graph_and_the_loss() -> bool:
    """:func:`one_graph_and_the_loss` from dynamo's counters (cleared before): what the compiled calls since then
    made, without explain's tracing pass of its own."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return (counters["stats"]["unique_graphs"] == 1 and bool(breaks)
            and all("lm_head_loss" in reason for reason in breaks))


@pytest.mark.parametrize("setting", SETTINGS)
def test_one_graph_and_one_break_at_the_loss_whatever_the_depth(setting: Setting) -> None:
    """Plain rows and packed ones with the padding-free arguments (on a GPU under autocast: varlen attention inside
    the graph)."""
    for layers, inputs in ((2, batch((2, 13), seed=0)), (2, packed([7, 9, 4], seed=0)), (3, batch((2, 13), seed=0))):
        model = llama(layers, setting)
        apply_kernels(model)
        torch._dynamo.reset()
        with setting.autocast():
            explanation = torch._dynamo.explain(model)(**setting.on_device(inputs))
        assert one_graph_and_the_loss(explanation), (layers, list(inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_reduce_overhead_replay_and_equal_eager() -> None:
    """``mode="reduce-overhead"``: the model's graph and its backward are CUDA graphs (inductor skips none: with
    ``cudagraph_or_error`` a skip fails here with inductor's reason), the fused loss runs in eager between them. Steps
    on one shape warm up, record, then replay the graph (counted: cudaGraphLaunch); a new shape records anew; every
    step equals eager. A step starts with ``cudagraph_mark_step_begin``, as a training loop over CUDA graphs does."""
    model = llama(setting=GPU)
    apply_kernels(model)
    compiled = torch.compile(model, mode="reduce-overhead")

    def step(**inputs: torch.Tensor) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(**inputs)

    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        for seed in range(3):  # warm-up, recording, replay
            assert_compiled_equals_eager(model, step, batch((2, 13), seed=seed), GPU)
        launches = step_events(model, step, batch((2, 13), seed=3), GPU, ("cudaGraphLaunch",))["cudaGraphLaunch"]
        assert launches >= 2  # the forward's graph and the backward's
        assert_compiled_equals_eager(model, step, batch((3, 7), seed=4), GPU)


# --------------------------------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from test_lora4bit_model import VOCAB as QLORA_VOCAB
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-compile-4bit")
    torch.manual_seed(0)
    # in_features multiples of the blocksize, as test_lora4bit_model's (bitsandbytes' CPU kernel needs it)
    LlamaForCausalLM(tiny_llama_config(QLORA_VOCAB, intermediate_size=128)).save_pretrained(path)
    return path


def qlora_batch(shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    from test_lora4bit_model import VOCAB as QLORA_VOCAB

    ids = torch.randint(1, QLORA_VOCAB, shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def kept_weights(model: torch.nn.Module, call: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 setting: Setting) -> list[tuple]:
    """The shapes of what one training step keeps for backward that has a 4-bit weight's element count and is not
    the model's own storage: a dequantized weight or its unpacked codes (traced by AOT autograd instead of opaque,
    the 4-bit ops kept the codes of every weight)."""
    import bitsandbytes as bnb

    sizes = {m.weight.quant_state.shape.numel() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list[tuple] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() in sizes and tensor.untyped_storage().data_ptr() not in own:
            kept.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), setting.autocast():
        loss_and_grads(model, call, setting.on_device(inputs))
    return kept


def _specs_and_params(case: str, device: str) -> tuple[bool, tuple, list[torch.Tensor | None]]:
    """(mlp, specs, params) of a 4-bit op: one projection with a bias; q/k/v with a bare, not double-quantized k;
    one with dropout; an MLP with a bare down projection; an MLP on the Triton path with fp16 (bf16) compute (its g
    and u in fp16 (bf16), its input and output fp32)."""
    import bitsandbytes.functional as bnb_functional

    from lamelm_fast.ops.lora4bit import _Spec
    from lamelm_fast.ops.quant4bit import Packed4bit

    def spec(out: int, inp: int, *, nested: bool = True, dropout: float = 0.0, adapted: bool = True,
             backend: str = "torch", compute: torch.dtype = torch.float32) -> _Spec:
        quantized = bnb_functional.quantize_4bit(torch.randn(out, inp, device=device), blocksize=64,
                                                 compress_statistics=nested, quant_type="nf4")
        return _Spec(Packed4bit.from_bnb(*quantized), 0.5, dropout, compute, torch.float32, backend, "auto", adapted)

    def lora(out: int, inp: int, bias: bool = False) -> list[torch.Tensor | None]:
        made = [torch.randn(4, inp, device=device), torch.randn(out, 4, device=device),
                torch.randn(out, device=device) if bias else None]
        return [t if t is None else t.requires_grad_() for t in made]

    triton = {"backend": "triton", "compute": torch.float16}
    triton_bf16 = {"backend": "triton", "compute": torch.bfloat16}
    return {
        "projection with bias": (False, (spec(32, 64),), lora(32, 64, bias=True)),
        "q/k/v, bare k": (False, (spec(32, 64), spec(16, 64, nested=False, adapted=False), spec(16, 64)),
                          [*lora(32, 64), None, None, None, *lora(16, 64)]),
        "dropout": (False, (spec(32, 64, dropout=0.3),), lora(32, 64)),
        "mlp, bare down": (True, (spec(96, 64), spec(96, 64), spec(64, 96, adapted=False)),
                           [*lora(96, 64), *lora(96, 64), None, None, None]),
        "mlp, triton fp16": (True, (spec(96, 64, **triton), spec(96, 64, **triton), spec(64, 96, **triton)),
                             [*lora(96, 64), *lora(96, 64), *lora(64, 96)]),
        "mlp, triton bf16": (True, (spec(96, 64, **triton_bf16), spec(96, 64, **triton_bf16),
                                    spec(64, 96, **triton_bf16)), [*lora(96, 64), *lora(96, 64), *lora(64, 96)]),
    }[case]


OPCHECK_CASES = ["projection with bias", "q/k/v, bare k", "dropout", "mlp, bare down", "mlp, triton fp16"]


@pytest.mark.parametrize(("case", "device"), [
    *((case, "cpu") for case in OPCHECK_CASES),
    # CUDA: the torch cases run the reference on CUDA tensors, the Triton ones the kernels; bf16 is the GPU's dtype
    # (the interpreter's bf16 dots are unreliable, so it is tested here only).
    *(pytest.param(case, "cuda", marks=ON_GPU) for case in [*OPCHECK_CASES, "mlp, triton bf16"])])
def test_the_4bit_custom_ops_pass_opcheck(case: str, device: str) -> None:
    """torch.library.opcheck: the fake (meta) outputs match the real ones, the autograd registration and the schema
    hold, and AOT autograd with dynamic shapes reproduces eager's outputs and gradients."""
    pytest.importorskip("bitsandbytes")
    from lamelm_fast.ops import lora4bit

    torch.manual_seed(0)
    mlp, specs, params = _specs_and_params(case, device)
    ints, floats, weights, present = lora4bit._encode(specs, params)
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lamelm_fast.lora4bit_forward.default, (mlp, ints, floats, weights, x, present))


LORA_OPS = ("lamelm_fast::lora4bit_forward", "lamelm_fast::lora4bit_backward")


@pytest.mark.parametrize(("targets", "dropout", "checkpointing", "backend", "setting"), [
    # every projection adapted: q/k/v and MLP ops, LoRA dropout
    pytest.param(None, 0.1, False, "torch", CPU, id="all-dropout-cpu"),
    # PEFT's default targets (bare k_proj and MLP projections), non-reentrant gradient checkpointing: the recompute
    # replays the dropout masks
    pytest.param(["q_proj", "v_proj"], 0.1, True, "torch", CPU, id="qv-dropout-checkpointing-cpu"),
    # the GPU's QLoRA: bitsandbytes' CUDA storage, bf16 compute, the Triton kernels inside the custom ops
    pytest.param(None, 0.1, False, "triton", GPU, id="all-dropout-cuda", marks=ON_GPU),
    pytest.param(["q_proj", "v_proj"], 0.1, True, "triton", GPU, id="qv-dropout-checkpointing-cuda", marks=ON_GPU),
])
def test_qlora_compiled_equals_eager(quantized_dir: Path, targets: list[str] | None, dropout: float,
                                     checkpointing: bool, backend: str, setting: Setting) -> None:
    """PEFT LoRA over bitsandbytes NF4 layers with the fused 4-bit ops: compiled equals eager, step after step; the
    compiled step runs the custom ops (one per adapted attention projection and one per MLP, forward again under
    checkpointing) and keeps no dequantized weight for backward (the ops are opaque to AOT autograd's partitioner)."""
    from test_lora4bit_model import TARGETS, qlora_model

    targets = targets or TARGETS
    model = qlora_model(quantized_dir, dropout=dropout, checkpointing=checkpointing, targets=targets,
                        device=setting.device)
    model.train()
    report = apply_kernels(model)
    assert report.cross_entropy and report.lora_layers == 2 * len(targets)
    compiled = compile_model(model, setting.backend)
    first = targets == TARGETS and not checkpointing  # the case that checks what backward keeps
    ops = model.get_base_model().config.num_hidden_layers * (
        1 + sum(name in ("q_proj", "k_proj", "v_proj", "o_proj") for name in targets))
    with use_backend(backend):
        torch._dynamo.utils.counters.clear()
        inputs = qlora_batch((2, 13), seed=0)
        assert_compiled_equals_eager(model, compiled, inputs, setting)
        # (With checkpointing, the hook that enable_input_require_grads puts on the embedding calls requires_grad_ on
        # an intermediate, which breaks the graph there too: transformers' code, not ours.)
        assert compiled_in_one_graph_and_the_loss() or checkpointing
        assert step_events(model, compiled, inputs, setting, LORA_OPS) == {
            "lamelm_fast::lora4bit_forward": ops * (2 if checkpointing else 1), "lamelm_fast::lora4bit_backward": ops}
        if first:  # (a second call: the compiled graph is reused; the other cases change nothing for it)
            assert_compiled_equals_eager(model, compiled, qlora_batch((2, 13), seed=1), setting)
            assert kept_weights(model, compiled, qlora_batch((2, 13), seed=3), setting) == []
