"""``python -m lamelm_fast.export CHECKPOINT OUTPUT``: a checkpoint as a standalone transformers model directory.

A LoRA or QLoRA checkpoint holds only the adapter; the export merges it into its base weights (W + scale * B @ A),
so the output loads with ``AutoModelForCausalLM.from_pretrained`` alone (vLLM, llama.cpp converters, the hub). For
QLoRA the adapter was trained against the NF4-quantized base, so by default it is merged into that base dequantized
(``--base quantized``: the exported model computes what the trained one did, up to the output dtype's rounding);
``--base original`` merges into the unquantized weights instead. A full fine-tune's checkpoint is a model already:
the export writes it in ``--dtype``. The output is written atomically (a temporary directory, then a rename).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from lamelm_fast.cli_parser import OneLineParser
from lamelm_fast.train.config import ConfigError, TrainConfig, first_line

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASES = ("quantized", "original")


def training_config(checkpoint: Path) -> TrainConfig:
    """The TrainConfig a checkpoint was written under (settings added since then take their defaults)."""
    from lamelm_fast.train import checkpoint as checkpoints

    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {checkpoint} not found: give a checkpoint-N directory of a run")
    inside = checkpoints.list_checkpoints(checkpoint)
    if inside:
        raise ConfigError(f"{checkpoint} is a run directory: give one of its checkpoints (the newest is {inside[-1]})")
    problem = checkpoints.verify_checkpoint(checkpoint)
    if problem is not None:
        raise ConfigError(f"{checkpoint} is not an intact lamelm-fast checkpoint ({problem}): export another one")
    saved = checkpoints.load_training_state(checkpoint)["config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in saved.items() if key in known})


def _dequantized_linear(layer: nn.Module, extra: torch.Tensor | None = None) -> nn.Linear:
    """A plain fp32 ``nn.Linear`` holding a bitsandbytes 4-bit layer's weight, dequantized exactly as the training
    kernels read it, plus ``extra`` (a merged adapter's delta)."""
    from lamelm_fast.ops.quant4bit import Packed4bit, dequantize_reference

    weight = dequantize_reference(Packed4bit.from_bnb(layer.weight, layer.weight.quant_state), torch.float32)
    if extra is not None:
        weight = weight + extra.to(weight.device, torch.float32)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device,
                       dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.float())
    return linear


def _merge_into_dequantized(peft_model: nn.Module) -> nn.Module:
    """Replace every LoRA layer over a 4-bit base by one fp32 Linear (dequantized base + its adapters' deltas) and
    every other 4-bit layer by its dequantized weight; returns the transformers model without PEFT or bitsandbytes."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()

    def replace(name: str, new: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)

    adapted = [(name, module) for name, module in model.named_modules()
               if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit)]
    for name, module in adapted:
        if any(module.use_dora.get(adapter, False) for adapter in module.active_adapters):
            raise ConfigError(f"{name}: a DoRA adapter cannot be merged here; export with --base original")
        delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters if adapter in module.lora_A)
        replace(name, _dequantized_linear(module.get_base_layer(), delta))
    # 4-bit layers without an adapter (--lora-target-modules left them out); the adapted ones are gone by now.
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]:
        replace(name, _dequantized_linear(module))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # saved as a plain model, loadable without bitsandbytes
    return model


def merged_model(checkpoint: Path, config: TrainConfig, base: str, device: torch.device) -> nn.Module:
    """The checkpoint's model with its adapter merged (LoRA, QLoRA) or as trained (full), in fp32 or the base's
    dtype."""
    from transformers import AutoModelForCausalLM

    if config.finetune == "full":
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    if config.model is None:
        raise ConfigError(f"{checkpoint} is an adapter for the embedded model, whose random base weights are not "
                          "saved, so there is nothing to merge it into: train the embedded model with --finetune "
                          "full (its checkpoints are whole models)")
    from peft import PeftModel

    from lamelm_fast.train.hub import cache_only_if_offline
    from lamelm_fast.train.model import keep_bnb_storage_layout, pretrained_source, quantized_load_kwargs

    try:
        source = pretrained_source(config)
    except ConfigError:  # (its words are for the trainer's --model)
        what = "has no config.json" if Path(str(config.model)).expanduser().exists() else "is no longer there"
        raise ConfigError(f"{checkpoint} was trained on the base model {config.model}, which {what}: give the base "
                          "model's location now with --model") from None
    cache_only_if_offline(source)
    quantized = config.finetune == "qlora" and base == "quantized"
    try:
        if quantized:
            base_model = AutoModelForCausalLM.from_pretrained(source, **quantized_load_kwargs(device))
            keep_bnb_storage_layout(base_model)
        else:
            base_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    except (OSError, ValueError) as error:
        raise ConfigError(f"could not load the base model '{config.model}' that {checkpoint} was trained on "
                          f"({first_line(error)}): make it available at that path or hub id, or give its "
                          "location with --model") from None
    peft_model = PeftModel.from_pretrained(base_model, str(checkpoint))
    return _merge_into_dequantized(peft_model) if quantized else peft_model.merge_and_unload()


def _umask() -> int:
    """The process's umask (read by setting it, then put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_merged(checkpoint: str | Path, output: str | Path, dtype: torch.dtype = torch.bfloat16,
                  base: str = "quantized", device: torch.device | None = None, model: str | None = None) -> Path:
    """Write ``checkpoint`` as a standalone model directory at ``output`` (see the module docstring); ``model``: the
    base model's directory or hub id where it is no longer where the run found it."""
    from transformers import AutoTokenizer

    checkpoint, output = Path(checkpoint), Path(output)
    if base not in BASES:
        raise ConfigError(f"--base {base}: choose one of {', '.join(BASES)}")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} exists and is not a directory: choose a directory path to write the model to")
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output} exists and is not empty: choose another output directory or delete it")
    # CPU by default: the merge is a few additions per weight, and host memory holds an fp32 copy of a model that a
    # GPU of the size QLoRA was chosen for may not.
    device = device or torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU torch can use; merge with --device cpu")
    config = training_config(checkpoint)
    if base != "quantized" and config.finetune != "qlora":
        raise ConfigError(f"--base {base} chooses the weights a QLoRA adapter is merged into; {checkpoint} is a "
                          f"{config.finetune} checkpoint (its base is not quantized): drop --base")
    if model is not None:
        config = dataclasses.replace(config, model=model)
    model = merged_model(checkpoint, config, base, device).to(dtype)
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Unique, so that two exports to one path cannot share it; removed whatever stops the write (Ctrl-C too).
        temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        temporary.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the model from a server run as another user
    except OSError as error:
        raise ConfigError(f"could not create {output.parent} ({first_line(error)}): choose another directory") from None
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(temporary, output)
    except OSError as error:
        raise ConfigError(f"could not write {output} ({first_line(error)}): nothing was left half-written; free "
                          "space or choose another directory") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # gone already when the rename succeeded
    return output


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m lamelm_fast.export",
                            description="Write a lamelm-fast checkpoint as a standalone transformers model, LoRA "
                                        "and QLoRA adapters merged into their base weights.")
    parser.add_argument("checkpoint", help="a checkpoint directory (run_dir/checkpoint-N)")
    parser.add_argument("output", help="the model directory to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="weights' dtype (default bfloat16)")
    parser.add_argument("--base", choices=BASES, default="quantized",
                        help="QLoRA: merge into the NF4 base dequantized, as trained (default), or into the original "
                             "unquantized weights")
    parser.add_argument("--device", default="cpu", help="where to load and merge: cpu (default) or cuda")
    parser.add_argument("--model", help="LoRA/QLoRA: the base model (directory or hub id), where it is no longer "
                                        "where the run loaded it from")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    try:
        path = export_merged(args.checkpoint, args.output, DTYPES[args.dtype], args.base, device, args.model)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

