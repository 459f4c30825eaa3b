"""``python -m lamelm_fast.export``: checkpoints of LoRA, QLoRA and full fine-tuning written as standalone models that
compute what the trained model computes (adapters merged), and clear errors for what cannot be exported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from lamelm_fast import apply_kernels
from lamelm_fast.export import export_merged, main, merged_model
from lamelm_fast.train import TrainConfig, train
from lamelm_fast.train.config import ConfigError
from lamelm_fast.train.model import keep_bnb_storage_layout, quantized_load_kwargs

CPU = torch.device("cpu")


def trained_checkpoint(tmp_path: Path, model_dir: Path, dataset: Path, finetune: str) -> Path:
    """Two steps at a high learning rate: the LoRA B matrices (zero at the start) are far from zero after them."""
    result = train(TrainConfig(model=str(model_dir), dataset=str(dataset), finetune=finetune, learning_rate=1e-2,
                               lora_dropout=0.0, max_steps=2, per_device_train_batch_size=4, max_seq_length=128,
                               eval_split_ratio=0.0, output_dir=str(tmp_path / finetune), quiet=True, seed=3))
    return result.checkpoint


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1, 200, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.double()


def exported(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_over(base: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(checkpoint))


def test_lora_adapter_merged_into_its_base(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    from transformers import AutoModelForCausalLM

    checkpoint = trained_checkpoint(tmp_path, tiny_model_dir, small_alpaca, "lora")
    out = export_merged(checkpoint, tmp_path / "merged", dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not any(p.name.startswith("adapter") for p in out.iterdir())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = logits(peft_over(base, checkpoint))
    assert rel_err(logits(exported(out)), reference) < 1e-5
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), reference) > 1e-3  # it learned


def test_qlora_adapter_merged_into_the_dequantized_or_the_original_base(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    checkpoint = trained_checkpoint(tmp_path, tiny_model_dir, small_alpaca, "qlora")
    quantized = export_merged(checkpoint, tmp_path / "quantized", dtype=torch.float32)
    original = export_merged(checkpoint, tmp_path / "original", dtype=torch.float32, base="original")
    merged = exported(quantized)
    assert "quantization_config" not in merged.config.to_dict()  # loads without bitsandbytes
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())

    base_4bit = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **quantized_load_kwargs(CPU))
    keep_bnb_storage_layout(base_4bit)
    # What training ran: the 4-bit base with the adapter, through our 4-bit LoRA op (bitsandbytes' own CPU kernel
    # misreads blocks that straddle rows, as this model's 96-wide down_proj has them).
    trained = peft_over(base_4bit, checkpoint)
    assert apply_kernels(trained, cross_entropy=False).lora_layers > 0
    as_trained = logits(trained)
    assert rel_err(logits(merged), as_trained) < 1e-5
    base_fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert rel_err(logits(exported(original)), logits(peft_over(base_fp32, checkpoint))) < 1e-5
    assert rel_err(logits(exported(original)), as_trained) > 1e-3  # NF4's rounding: the choice matters


def test_full_checkpoint_written_in_the_asked_dtype(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import SAFE_WEIGHTS_NAME

    checkpoint = trained_checkpoint(tmp_path, tiny_model_dir, small_alpaca, "full")
    capsys.readouterr()  # the training run's summary
    assert main([str(checkpoint), str(tmp_path / "bf16")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'bf16'}"
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "bf16" / SAFE_WEIGHTS_NAME))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    trained = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert rel_err(logits(exported(tmp_path / "bf16")), logits(trained)) < 2e-2
    assert exported(tmp_path / "bf16").config.use_cache  # generation gets its KV cache back
    # Readable as save_pretrained's own directories are (umask 022: rwxr-xr-x), by a server run as another user.
    mask = os.umask(0o022)
    try:
        assert main([str(checkpoint), str(tmp_path / "shared")]) == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755


def test_what_cannot_be_exported_is_refused_clearly(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = trained_checkpoint(tmp_path, tiny_model_dir, small_alpaca, "lora")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([str(checkpoint), str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), str(tmp_path / "x"), "--device", "gpu"])
    assert exit_info.value.code == 2 and "--device gpu: expected cpu, cuda or cuda:N" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main([str(checkpoint.parent), str(tmp_path / "x")]) == 2
    assert f"is a run directory: give one of its checkpoints (the newest is {checkpoint})" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "nope not found: give a checkpoint-N directory" in capsys.readouterr().err
    assert main([str(checkpoint), str(tmp_path / "x"), "--base", "original"]) == 2
    assert "a lora checkpoint (its base is not quantized): drop --base" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("mine")
    assert main([str(checkpoint), str(tmp_path / "a-file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([str(checkpoint), str(tmp_path / "x"), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="random base weights are not saved"):
        merged_model(checkpoint, TrainConfig(finetune="lora"), "quantized", CPU)  # an embedded-model adapter
    (checkpoint / "adapter_model.safetensors").write_bytes(b"broken")
    assert main([str(checkpoint), str(tmp_path / "out")]) == 2
    assert "not an intact lamelm-fast checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_interrupted_export_leaves_nothing_behind(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PreTrainedModel

    checkpoint = trained_checkpoint(tmp_path, tiny_model_dir, small_alpaca, "full")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_merged(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_relative_model_path_is_recorded_absolute_and_a_moved_base_is_given_with_model(
        tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    monkeypatch.chdir(tmp_path)
    checkpoint = trained_checkpoint(tmp_path, Path("models/base"), small_alpaca, "lora")
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run's working directory no longer matters
    assert main([str(checkpoint), str(tmp_path / "out1"), "--dtype", "float32"]) == 0
    shutil.move(str(base), str(tmp_path / "moved"))
    capsys.readouterr()
    assert main([str(checkpoint), str(tmp_path / "out2"), "--dtype", "float32"]) == 2
    assert (f"was trained on the base model {base.resolve()}, which is no longer there: give the base model's "
            "location now with --model") in capsys.readouterr().err
    assert main([str(checkpoint), str(tmp_path / "out2"), "--dtype", "float32", "--model",
                 str(tmp_path / "moved")]) == 0
    assert torch.equal(logits(exported(tmp_path / "out1")), logits(exported(tmp_path / "out2")))
