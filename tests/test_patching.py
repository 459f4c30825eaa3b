"""apply_kernels: the fused loss inside HF causal LMs (and PEFT wrappers) equals the models' own loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from lamelm_fast import apply_kernels
from lamelm_fast.ops.dispatch import use_backend

SIZES = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZES),
    "mistral": lambda: MistralConfig(**SIZES),
    "qwen2": lambda: Qwen2Config(**SIZES),
    "qwen3": lambda: Qwen3Config(**SIZES),
    "gemma": lambda: GemmaConfig(**SIZES),
    # A softcap small enough to bend these logits, so a missing softcap could not pass.
    "gemma2": lambda: Gemma2Config(**SIZES, final_logit_softcapping=1.5),
    "gemma3_text": lambda: Gemma3TextConfig(**SIZES, final_logit_softcapping=1.5),
}


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 101, (2, 13), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    labels[1, 9:] = -100
    return input_ids, labels


def pair(model_type: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(CONFIGS[model_type]()).train()
    return reference, copy.deepcopy(reference)


def loss_and_grads(model: torch.nn.Module, **kwargs: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# Every family's patched loss on the torch reference; on the Triton kernel (interpreted on CPU: ~2.5 s a family) the
# two losses the families ask of it, which differ only in Gemma's softcap: same sizes, same kernel code otherwise.
@pytest.mark.parametrize(("model_type", "backend"), [*((model_type, "torch") for model_type in CONFIGS),
                                                     ("llama", "triton"), ("gemma2", "triton")])
def test_fused_loss_equals_the_models_own(model_type: str, backend: str) -> None:
    reference, ours = pair(model_type)
    report = apply_kernels(ours, lora=False)
    assert report.cross_entropy
    input_ids, labels = batch()
    for extra in ({}, {"num_items_in_batch": torch.tensor(7)}):
        expected, expected_grads = loss_and_grads(reference, input_ids=input_ids, labels=labels, **extra)
        with use_backend(backend):
            loss, grads = loss_and_grads(ours, input_ids=input_ids, labels=labels, **extra)
        assert rel(loss, expected) < 1e-5
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert rel(grad, expected_grads[name]) < 1e-4, name


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_every_norm_attention_and_swiglu_mlp_is_fused(model_type: str) -> None:
    reference, ours = pair(model_type)
    report = apply_kernels(ours, lora=False)
    names = [type(m).__name__ for m in reference.modules()]
    assert report.rms_norms == sum(name.endswith("RMSNorm") for name in names) > 0
    assert report.rope_attentions == sum(name.endswith("Attention") for name in names) == 2
    # Gemma's MLPs use GELU: not a SwiGLU, left alone
    assert report.swiglu_mlps == (0 if model_type.startswith("gemma") else 2)
    assert ours.state_dict().keys() == reference.state_dict().keys()


def test_training_output_has_no_logits_and_eval_is_the_models_own() -> None:
    reference, ours = pair("llama")
    apply_kernels(ours, lora=False)
    input_ids, labels = batch(1)
    seen: list[tuple[int, ...]] = []
    ours.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    out = ours(input_ids=input_ids, labels=labels)
    assert out.logits is None and out["loss"] is out.loss and out.to_tuple()[0] is out.loss
    assert seen == [(2, 1, 101)]  # the head ran on one position per row, never on every token
    as_tuple = ours(input_ids=input_ids, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], out.loss)
    ours.eval()
    reference.eval()
    with torch.no_grad():
        mine, theirs = ours(input_ids=input_ids, labels=labels), reference(input_ids=input_ids, labels=labels)
    assert torch.equal(mine.logits, theirs.logits) and torch.equal(mine.loss, theirs.loss)


def test_shift_labels_keep_their_meaning() -> None:
    reference, ours = pair("qwen3")
    apply_kernels(ours, lora=False)
    input_ids, labels = batch(2)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    expected, _ = loss_and_grads(reference, input_ids=input_ids, labels=labels)
    loss, _ = loss_and_grads(ours, input_ids=input_ids, labels=torch.zeros_like(labels), shift_labels=shifted)
    assert rel(loss, expected) < 1e-5


def test_under_a_peft_wrapper_lora_gradients_match() -> None:
    from peft import LoraConfig, get_peft_model

    reference, _ = pair("llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    reference = get_peft_model(reference, lora)
    for name, param in reference.named_parameters():  # B starts at zero, which would zero the A gradients too
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    ours = copy.deepcopy(reference)
    apply_kernels(ours, lora=False)
    ours.train()
    reference.train()
    input_ids, labels = batch(3)
    expected, expected_grads = loss_and_grads(reference, input_ids=input_ids, labels=labels)
    loss, grads = loss_and_grads(ours, input_ids=input_ids, labels=labels)
    assert rel(loss, expected) < 1e-5
    assert grads.keys() == expected_grads.keys() and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert rel(grad, expected_grads[name]) < 1e-4, name


def test_lora_on_the_head_is_refused_not_dropped() -> None:
    from peft import LoraConfig, get_peft_model

    _, ours = pair("llama")
    model = get_peft_model(ours, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        apply_kernels(model, lora=False)


def test_unsupported_model_type_is_refused() -> None:
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="cross_entropy=False"):
        apply_kernels(model, lora=False)


def test_a_module_that_is_not_a_transformers_model() -> None:
    """Its layers can still be patched (cross_entropy=False), and the loss patch says why it cannot apply, instead of
    failing on a missing ``config`` attribute."""
    module = nn.Sequential(nn.Linear(8, 8))
    report = apply_kernels(module, cross_entropy=False)
    assert not report.cross_entropy
    with pytest.raises(ValueError, match="Sequential is not a transformers causal LM.*cross_entropy=False"):
        apply_kernels(module)


def test_patching_twice_is_harmless() -> None:
    reference, ours = pair("mistral")
    apply_kernels(ours, lora=False)
    apply_kernels(ours, lora=False)
    input_ids, labels = batch(4)
    expected, _ = loss_and_grads(reference, input_ids=input_ids, labels=labels)
    loss, _ = loss_and_grads(ours, input_ids=input_ids, labels=labels)
    assert rel(loss, expected) < 1e-5


def test_the_patched_forward_shows_the_models_signature_to_hf_trainer(tmp_path) -> None:
    """HF's Trainer keeps the dataset columns its model's forward names (remove_unused_columns, on by default)."""
    import inspect

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    reference, ours = pair("llama")
    apply_kernels(ours, lora=False)
    assert inspect.signature(ours.forward) == inspect.signature(reference.forward)
    input_ids, labels = batch(5)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist(), "text": ["x", "y"]})
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1, learning_rate=1e-3)
    histories = []
    for model in (reference, ours):
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        histories.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
    assert len(histories[1]) == 2 and all(abs(a - b) < 1e-4 * abs(a) for a, b in zip(*histories, strict=True))


def test_positional_labels_pickling_and_saving(tmp_path) -> None:
    import io
    import json

    reference, ours = pair("llama")
    apply_kernels(ours, lora=False)  # varlen attention's hooks included
    input_ids, labels = batch(6)
    expected, _ = loss_and_grads(reference, input_ids=input_ids, labels=labels)
    ours.zero_grad(set_to_none=True)
    # (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels): Llama's order
    assert rel(ours(input_ids, None, None, None, None, labels).loss, expected) < 1e-5
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(ours)
    loss, _ = loss_and_grads(loaded, input_ids=input_ids, labels=labels)
    assert rel(loss, expected) < 1e-5
    ours.save_pretrained(tmp_path)  # config.json names the model's own class, which other tools look up
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_the_softcap_is_the_one_the_models_own_forward_applies() -> None:
    """Gemma 3's multimodal class applies no final softcap although its text config has one: neither do we."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = Gemma3TextConfig(**SIZES, final_logit_softcapping=1.0)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=100, boi_token_index=99, eoi_token_index=98)
    torch.manual_seed(0)
    reference = Gemma3ForConditionalGeneration(config).train()
    ours = copy.deepcopy(reference)
    apply_kernels(ours, lora=False)
    input_ids, labels = batch(7)
    input_ids, labels = input_ids.clamp(max=97), labels.clamp(max=97)  # no image tokens
    expected, _ = loss_and_grads(reference, input_ids=input_ids, labels=labels)
    loss, _ = loss_and_grads(ours, input_ids=input_ids, labels=labels)
    assert rel(loss, expected) < 1e-5


def test_a_patched_model_loads_in_another_process(tmp_path) -> None:
    """Patched classes exist only in the process that patched: their instances pickle as mixin over base, rebuilt on
    load (torch.save(model), spawned workers)."""
    import subprocess
    import sys

    reference, ours = pair("llama")
    apply_kernels(ours, lora=False)  # every patch: the loss, the decoder's packed-row marks, norms, RoPE, SwiGLU
    input_ids, labels = batch(8)
    expected, _ = loss_and_grads(ours, input_ids=input_ids, labels=labels)
    torch.save({"model": ours, "input_ids": input_ids, "labels": labels}, tmp_path / "patched.pt")
    script = (
        "import inspect, sys, torch\n"
        f"saved = torch.load({str(tmp_path / 'patched.pt')!r}, weights_only=False)\n"
        "model = saved['model']\n"
        "assert type(model).__name__ == 'LlamaForCausalLM'\n"
        "assert 'input_ids' in inspect.signature(model.forward).parameters\n"
        "assert type(model.model.layers[0].mlp).__name__.startswith('SwiGLU')\n"
        "print(model(input_ids=saved['input_ids'], labels=saved['labels']).loss.item())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout.split()[-1]) - expected.item()) <= 1e-5 * abs(expected.item())
