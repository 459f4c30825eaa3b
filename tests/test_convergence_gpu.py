"""GPU: the trainer converges the same with its kernels as with the torch references (DESIGN: "mini Llama, 32+ steps
with and without our kernels: losses agree"). ``--kernels auto`` runs every fused op's Triton or CUDA kernel (fused
cross-entropy, AdamW, 4-bit LoRA, RMSNorm, RoPE, SwiGLU); ``--kernels torch`` runs their references, which equal
transformers' and PEFT's own ops. Same model, data, seed and recipe; bf16 on the GPU, so the curves agree to rounding,
not bit for bit."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from lamelm_fast.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
STEPS = 40


@pytest.fixture(scope="module")
def mini_llama_dir(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer) -> Path:
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("mini-llama")
    torch.manual_seed(0)
    config = tiny_llama_config(len(embedded_tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    LlamaForCausalLM(config).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


def losses(model_dir: Path, out: Path, finetune: str, kernels: str, **settings: object,
           ) -> tuple[list[float], list[float]]:
    result = train(TrainConfig(
        model=str(model_dir), finetune=finetune, kernels=kernels, max_steps=STEPS, logging_steps=1,
        per_device_train_batch_size=4, max_seq_length=256, learning_rate=1e-3 if finetune == "full" else 2e-3,
        bf16=True, gradient_checkpointing=True, eval_split_ratio=0.0, seed=3, output_dir=str(out), quiet=True,
        **settings))
    rows = [row for row in result.history if row["type"] == "train"]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return [row["loss"] for row in rows], [row["grad_norm"] for row in rows]


# The last case: bf16 weights with fp32 masters in the fused AdamW, and checkpointing that keeps attention (torch's
# varlen kernel on these packed batches, saved by the selective checkpoint).
@pytest.mark.parametrize(("finetune", "settings"), [
    ("full", {}), ("lora", {}), ("qlora", {}),
    ("full", {"bf16_weights": True, "gradient_checkpointing_policy": "keep_attention"})],
    ids=["full", "lora", "qlora", "full-bf16-weights-keep-attention"])
def test_kernels_train_like_the_references(mini_llama_dir: Path, tmp_path: Path, finetune: str,
                                           settings: dict[str, object]) -> None:
    if finetune == "qlora":
        pytest.importorskip("bitsandbytes")
    ours, our_norms = losses(mini_llama_dir, tmp_path / "kernels", finetune, "auto", **settings)
    reference, reference_norms = losses(mini_llama_dir, tmp_path / "torch", finetune, "torch", **settings)
    # The first step sees the same weights: only rounding differs.
    assert abs(ours[0] - reference[0]) / reference[0] < 5e-3
    assert abs(our_norms[0] - reference_norms[0]) / reference_norms[0] < 2e-2
    # Both learn (on CPU in fp32 the 40 steps take LoRA from ~8.0 to ~7.7 and a full fine-tune from ~7.7 to ~6.0,
    # window means), and the curves stay together well inside that (single steps are noisy: window means).
    window = 10
    for curve in (ours, reference):
        assert statistics.mean(curve[-window:]) < statistics.mean(curve[:window]) - 0.1
    for start in range(0, STEPS, window):
        mine, theirs = statistics.mean(ours[start:start + window]), statistics.mean(reference[start:start + window])
        assert abs(mine - theirs) / theirs < (0.01 if start == 0 else 0.02), (start, mine, theirs)
