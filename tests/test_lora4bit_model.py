"""A whole tiny Llama in QLoRA (PEFT over bitsandbytes NF4), patched by patch_peft_lora4bit, against unpatched PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import count_calls, tiny_llama_config

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from test_lora4bit import rel_err  # noqa: E402
from test_nf4_dequant import eager_bitsandbytes  # noqa: E402, F401  (autouse fixture)

from lamelm_fast.ops import dispatch  # noqa: E402
from lamelm_fast.ops.dispatch import use_backend, use_nf4_matmul  # noqa: E402
from lamelm_fast.ops.lora4bit import patch_peft_lora4bit  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-4bit")
    torch.manual_seed(0)
    # in_features multiples of the blocksize: bitsandbytes' AVX-512 CPU kernel misreads blocks straddling rows.
    LlamaForCausalLM(tiny_llama_config(VOCAB, intermediate_size=128)).save_pretrained(path)
    return path


def load_4bit(path: Path, device: str = "cpu", compute_dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if compute_dtype is None:
        compute_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": device})


def qlora_model(path: Path, *, dropout: float, checkpointing: bool, device: str = "cpu",
                compute_dtype: torch.dtype | None = None, targets: list[str] = TARGETS) -> nn.Module:
    model = peft.prepare_model_for_kbit_training(load_4bit(path, device, compute_dtype),
                                                 use_gradient_checkpointing=checkpointing,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)  # PEFT starts B at zero, which would zero every gradient of A
    return model


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout samples for both models
    loss = model(input_ids=ids, labels=ids).loss
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {type(node).__name__ for node in seen}


@pytest.mark.parametrize(("backend", "dropout", "checkpointing"),
                         [("torch", 0.1, False), ("torch", 0.0, True), ("triton", 0.1, False)])
def test_patched_tiny_llama_equals_peft(quantized_dir: Path, backend: str, dropout: float,
                                        checkpointing: bool) -> None:
    ref_model = qlora_model(quantized_dir, dropout=dropout, checkpointing=checkpointing)
    model = copy.deepcopy(ref_model)
    assert patch_peft_lora4bit(model) == 2 * len(TARGETS)
    layer = model.base_model.model.model.layers[0]
    assert type(layer.mlp).__name__ == "FusedLlamaMLP"
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 13))
    with use_backend(backend):
        loss, grads, nodes = loss_and_grads(model, ids)
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    # The fused MLP and the fused q/k/v op ran (o_proj as a single fused layer).
    assert {"_LoRA4bitSwiGLUBackward", "_SharedInputLoRA4bitBackward"} <= nodes
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_projections_without_adapters_run_fused_too(quantized_dir: Path, backend: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--lora-target-modules q_proj,v_proj (PEFT's default for Llama): k_proj and the MLP's projections are bare
    bitsandbytes layers. The MLP still runs as one op (on a GPU: g and u in bf16, not the fp32 bitsandbytes hands
    back), k_proj runs in the q/k/v op over the shared input, and the loss and the adapters' gradients, which flow
    back through both, equal PEFT's."""
    from lamelm_fast.ops import lora4bit

    ref_model = qlora_model(quantized_dir, dropout=0.1, checkpointing=False, targets=["q_proj", "v_proj"])
    model = copy.deepcopy(ref_model)
    assert patch_peft_lora4bit(model) == 2 * 2
    layer = model.base_model.model.model.layers[0]
    assert type(layer.mlp).__name__ == "FusedLlamaMLP" and type(layer.self_attn.k_proj).__name__ == "GroupedLinear4bit"
    assert type(layer.self_attn.o_proj).__name__ == "Linear4bit"  # alone: bitsandbytes' own, as before
    groups = []
    apply = lora4bit._SharedInputLoRA4bit.apply
    monkeypatch.setattr(lora4bit._SharedInputLoRA4bit, "apply",
                        lambda x, specs, *params: groups.append([s.adapted for s in specs]) or apply(x, specs, *params))
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(6))
    with use_backend(backend):
        loss, grads, nodes = loss_and_grads(model, ids)
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert groups == [[True, False, True]] * 2  # one q/k/v op per layer, k bare inside it
    assert "_LoRA4bitSwiGLUBackward" in nodes
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 2
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


def test_a_model_without_peft_layers_is_left_alone(quantized_dir: Path) -> None:
    model = load_4bit(quantized_dir)
    assert patch_peft_lora4bit(model) == 0
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_apply_kernels_with_the_dequant_strategy_equals_peft(quantized_dir: Path, launches: dict[str, int],
                                                             monkeypatch: pytest.MonkeyPatch, dropout: float) -> None:
    """LAMELM_NF4_MATMUL=dequant: every 4-bit product of the fused MLP, the fused q/k/v op (their input gradients
    accumulate into one buffer; without dropout, one GEMM makes all three) and o_proj is dequantize + matmul; loss
    and LoRA gradients equal PEFT's."""
    from lamelm_fast import apply_kernels
    from lamelm_fast.kernels import nf4_lora

    ref_model = qlora_model(quantized_dir, dropout=dropout, checkpointing=False)
    model = copy.deepcopy(ref_model)
    assert apply_kernels(model).lora_layers == 2 * len(TARGETS)
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv(dispatch.NF4_MATMUL_ENV_VAR, "dequant")
    summed = count_calls(monkeypatch, nf4_lora, {"q/k/v input gradient": "dequant_matmul_4bit_lora_sum"})
    loss, grads, nodes = loss_and_grads(model, ids)
    # Each projection: forward and input gradient, but for q/k/v of layer 0, whose input (the embeddings, frozen,
    # no checkpointing hook) needs no gradient; without dropout layer 1's q/k/v input gradient is one product.
    one_gemm = dropout == 0.0
    assert launches == {"fused": 0, "dequant": 2 * 2 * len(TARGETS) - 3 - 3 * one_gemm}
    assert summed == {"q/k/v input gradient": int(one_gemm)}
    with use_nf4_matmul("fused"):
        fused_loss, fused_grads, _ = loss_and_grads(model, ids)
    monkeypatch.delenv(dispatch.ENV_VAR)
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert {"_LoRA4bitSwiGLUBackward", "_SharedInputLoRA4bitBackward"} <= nodes
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(loss, fused_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
        assert rel_err(grad, fused_grads[name]) < 1e-5, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("strategy", "targets"), [("fused", TARGETS), ("dequant", TARGETS), ("auto", TARGETS),
                                                   ("auto", ["q_proj", "v_proj"])])
def test_patched_tiny_llama_equals_peft_cuda_bf16_autocast(quantized_dir: Path, strategy: str,
                                                           targets: list[str]) -> None:
    """As the trainer runs QLoRA on a GPU: bf16 compute under autocast, fp32 adapters, Triton kernels (with q/v
    targets only, the MLP runs fused over its bare 4-bit projections)."""
    ref_model = qlora_model(quantized_dir, dropout=0.0, checkpointing=True, device="cuda", targets=targets)
    model = copy.deepcopy(ref_model)
    assert patch_peft_lora4bit(model) == 2 * len(targets)
    ids = torch.randint(1, VOCAB, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with use_backend("triton"), use_nf4_matmul(strategy):
            loss, grads, nodes = loss_and_grads(model, ids)
        ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert {"_LoRA4bitSwiGLUBackward", "_SharedInputLoRA4bitBackward"} <= nodes
    assert rel_err(loss, ref_loss) < 1e-2
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 5e-2, name


def test_adapter_saved_after_patching_loads_in_peft(quantized_dir: Path, tmp_path: Path) -> None:
    model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False)
    before = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    patch_peft_lora4bit(model)
    state = peft.get_peft_model_state_dict(model)
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    model.save_pretrained(tmp_path / "adapter")

    loaded = peft.PeftModel.from_pretrained(load_4bit(quantized_dir), tmp_path / "adapter")
    for module in loaded.modules():  # bitsandbytes' CPU inference repack computes differently: keep its layout
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    loaded_state = peft.get_peft_model_state_dict(loaded)
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)
    ids = torch.randint(1, VOCAB, (1, 9))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_apply_kernels_fuses_the_loss_and_the_lora_layers_together(quantized_dir: Path) -> None:
    from lamelm_fast import apply_kernels

    ref_model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False)
    model = copy.deepcopy(ref_model)
    report = apply_kernels(model)
    assert report.cross_entropy and report.lora_layers == 2 * len(TARGETS)
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    loss, grads, nodes = loss_and_grads(model, ids)
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert "_LinearCrossEntropyFunctionBackward" in nodes
    assert rel_err(loss, ref_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("swiglu_first", [True, False])
def test_swiglu_patch_and_4bit_patch_compose_in_either_order(quantized_dir: Path, swiglu_first: bool) -> None:
    """The plain SwiGLU patch never hides the 4-bit fused MLP, whichever runs first."""
    from lamelm_fast.ops.swiglu import patch_swiglu

    ref_model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False)
    model = copy.deepcopy(ref_model)
    if swiglu_first:
        assert patch_swiglu(model) == 2
    assert patch_peft_lora4bit(model) == 2 * len(TARGETS)
    assert patch_swiglu(model) == 2
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp).__name__ == ("FusedSwiGLULlamaMLP" if swiglu_first else "FusedLlamaMLP")
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    with use_backend("triton"):
        loss, grads, nodes = loss_and_grads(model, ids)
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert "_LoRA4bitSwiGLUBackward" in nodes and "_SwiGLUFunctionBackward" not in nodes
    assert rel_err(loss, ref_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    # Adapters disabled: the 4-bit MLP falls back to PEFT's projections around the plain fused SwiGLU.
    with model.disable_adapter(), torch.no_grad():
        fallback = model(input_ids=ids).logits
    with ref_model.disable_adapter(), torch.no_grad():
        assert rel_err(fallback, ref_model(input_ids=ids).logits) < 1e-5


def test_fused_mlp_keeps_its_tensors_in_a_narrower_compute_dtype(quantized_dir: Path) -> None:
    """fp32 activations (prepare_model_for_kbit_training) with 16-bit compute: on the Triton path the fused MLP saves
    g and u in the compute dtype (half the bytes), and loss and LoRA gradients still match PEFT's to 16-bit rounding.
    fp16 here: the interpreter's 16-bit dots are right in fp16, not in bf16."""
    ref_model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False, compute_dtype=torch.float16)
    model = copy.deepcopy(ref_model)
    assert patch_peft_lora4bit(model) == 2 * len(TARGETS)
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7))
    with use_backend("triton"):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        node, stack, saved = None, [loss.grad_fn], None
        while stack and saved is None:
            node = stack.pop()
            if type(node).__name__ == "_LoRA4bitSwiGLUBackward":
                saved = node.saved_tensors
            stack.extend(fn for fn, _ in node.next_functions if fn is not None)
        x, g, u = saved[:3]
        assert x.dtype == torch.float32 and g.dtype == u.dtype == torch.float16
        del saved, node, stack, loss
        loss, grads, _ = loss_and_grads(model, ids)
    ref_loss, ref_grads, _ = loss_and_grads(ref_model, ids)
    assert rel_err(loss, ref_loss) < 1e-3
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-2, name


def test_projections_sharing_an_input_share_its_adapter_cast(quantized_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast the adapters run in bf16: q/k/v cast their fp32 input once, not three times, and gate/up once,
    not twice (forward; backward likewise). Counted as fp32 -> bf16 copies of the layers' input shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lamelm_fast.ops import lora4bit

    model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False)
    assert patch_peft_lora4bit(model) == 2 * len(TARGETS)
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(8))
    hidden = model.config.hidden_size

    class CountCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            source = args[0] if args else None
            if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                    and isinstance(source, torch.Tensor) and source.dtype == torch.float32
                    and tuple(source.shape) == (ids.numel(), hidden)):
                CountCasts.count += 1
            return func(*args, **kwargs)

    def casts_in_a_forward() -> int:
        CountCasts.count = 0
        with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("torch"), CountCasts(), torch.no_grad():
            model(input_ids=ids)
        return CountCasts.count

    shared = casts_in_a_forward()
    monkeypatch.setattr(lora4bit._Casts, "to", lambda self, dtype: self.tensor.to(dtype))  # a cast per request
    unshared = casts_in_a_forward()
    layers = model.config.num_hidden_layers
    # q/k/v: 3 -> 1, gate/up: 2 -> 1; and the cast kept for backward is the shared one, not one more (2 per layer)
    assert unshared - shared == (2 + 1 + 2) * layers


@pytest.mark.parametrize("tied", [False, True], ids=["separate-head", "tied-head"])
def test_frozen_embedding_and_head_stay_16_bit_with_the_same_numbers(tmp_path: Path, tied: bool) -> None:
    from transformers import LlamaForCausalLM

    from lamelm_fast.train.data import Example, collate
    from lamelm_fast.train.model import causal_lm_loss, narrow_frozen_lookup_weights

    path = tmp_path / "bf16"
    torch.manual_seed(0)  # a bf16 checkpoint, as Llama-3's: the embedding and head load in bf16
    LlamaForCausalLM(tiny_llama_config(VOCAB, intermediate_size=128, tie_word_embeddings=tied)).to(
        torch.bfloat16).save_pretrained(path)
    generator = torch.Generator().manual_seed(3)
    batch = collate([Example(torch.randint(1, VOCAB, (n,), generator=generator).tolist(), [False] + [True] * (n - 1))
                     for n in (13, 7, 21)], packing=True, pad_token_id=0)

    def run(narrow: bool) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(1)  # the same LoRA A matrices
        base = load_4bit(path)
        loaded = {id(p): p.dtype for p in base.parameters()}
        model = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        saved = narrow_frozen_lookup_weights(model, loaded) if narrow else 0
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        patch_peft_lora4bit(model)
        loss, _ = causal_lm_loss(model, batch, batch.num_targets, torch.bfloat16)  # bf16 autocast, as on a GPU
        loss.backward()
        return saved, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    saved, loss, grads = run(narrow=True)
    _, ref_loss, ref_grads = run(narrow=False)
    assert saved == (1 if tied else 2) * VOCAB * 64 * 2  # fp32 -> bf16: 2 bytes a weight
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


def test_backward_keeps_the_inputs_adapter_cast_not_the_fp32_input(quantized_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """QLoRA under autocast: the fused ops' input is fp32 (PEFT's fp32 residual stream) and backward reads it only
    through its bf16 cast (for dA), so that cast is what they keep: half the bytes per layer (q/k/v and gate/up
    inputs), the same gradients to the bit."""
    from lamelm_fast.ops import lora4bit

    model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False)
    patch_peft_lora4bit(model)
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(9))
    shape = (ids.numel(), model.config.hidden_size)

    def run() -> tuple[dict[torch.dtype, int], dict[str, torch.Tensor]]:
        kept: dict[torch.dtype, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tuple(tensor.shape) == shape:
                kept[tensor.dtype] = kept.get(tensor.dtype, 0) + 1
            return tensor

        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("torch"), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        return kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept, grads = run()
    monkeypatch.setattr(lora4bit, "_input_for_backward", lambda x, casts, specs: x)  # keep the fp32 input
    kept_fp32, grads_fp32 = run()
    layers = model.config.num_hidden_layers
    assert kept_fp32.get(torch.float32, 0) - kept.get(torch.float32, 0) == 2 * layers
    assert kept.get(torch.bfloat16, 0) - kept_fp32.get(torch.bfloat16, 0) == 2 * layers
    assert grads.keys() == grads_fp32.keys() and all(torch.equal(grads[n], grads_fp32[n]) for n in grads)


def test_the_report_says_which_layers_were_left_to_peft_and_why(quantized_dir: Path) -> None:
    from lamelm_fast import apply_kernels

    model = peft.get_peft_model(load_4bit(quantized_dir), peft.LoraConfig(r=4, use_dora=True,
                                                                          target_modules=["q_proj"]))
    report = apply_kernels(model, cross_entropy=False)
    assert report.lora_layers == 0
    assert any(note.startswith("2 4-bit LoRA layer(s) left to PEFT: ") and "DoRA" in note for note in report.notes)
    assert not any("nothing to swap" in note for note in report.notes)


def test_the_qkv_group_under_inference_mode_and_across_threads(quantized_dir: Path) -> None:
    """Inference tensors have no version counter: the group runs its projections apart. What a thread leaves pending
    is its own: another thread's q call in between does not hand it the other's k and v."""
    from concurrent.futures import ThreadPoolExecutor

    model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False, targets=["q_proj", "v_proj"]).eval()
    patch_peft_lora4bit(model)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, expected)

    attention = model.base_model.model.model.layers[0].self_attn
    xs = [torch.randn(1, 5, attention.q_proj.in_features, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        alone = [[proj(x) for proj in (attention.q_proj, attention.k_proj, attention.v_proj)] for x in xs]
        outs: list[list[torch.Tensor]] = [[], []]
        steps = [(0, attention.q_proj), (1, attention.q_proj), (0, attention.k_proj), (0, attention.v_proj),
                 (1, attention.k_proj), (1, attention.v_proj)]  # interleaved: each thread its own pending outputs
        threads = [ThreadPoolExecutor(max_workers=1) for _ in xs]  # one worker thread each, for all its calls
        for who, proj in steps:
            outs[who].append(threads[who].submit(proj, xs[who]).result())
        for pool in threads:
            pool.shutdown()
    for mine, theirs in zip(outs, alone, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_a_model_patched_twice_pickles(quantized_dir: Path) -> None:
    """apply_kernels without the 4-bit patch, then with it: the MLP's class is a mixin over a patched class, which
    pickles as its recipe too."""
    import io

    from lamelm_fast import apply_kernels

    model = qlora_model(quantized_dir, dropout=0.0, checkpointing=False)
    apply_kernels(model, lora=False)
    apply_kernels(model)
    assert type(model.base_model.model.model.layers[0].mlp).__mro__[2].__name__ == "SwiGLULlamaMLP"
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
