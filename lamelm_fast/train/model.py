"""Model and tokenizer loading (embedded default, hub id or local dir; full, LoRA or QLoRA) and the loss.

The loss runs the decoder for hidden states and then ``fused_linear_cross_entropy`` on the LM head weight,
so the full [tokens, vocab] logits never exist in training.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamelm_fast import patching
from lamelm_fast.metrics.throughput import logical_numel
from lamelm_fast.ops.dispatch import resolve_backend
from lamelm_fast.ops.varlen_attention import DeferredMask, flash_device
from lamelm_fast.train.activation_checkpointing import enable_activation_checkpointing
from lamelm_fast.train.config import ConfigError, TrainConfig, first_line
from lamelm_fast.train.data import Batch
from lamelm_fast.train.hub import cache_only_if_offline, load_error

CHECK_SOURCE = "give a local model directory or check the hub id and the network"


def embedded_asset(name: str) -> str:
    return str(resources.files("lamelm_fast.assets") / name)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator or a leading ./ ~ is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def pretrained_source(config: TrainConfig) -> str:
    name = config.model
    assert name is not None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {name} has no config.json: point --model at a directory "
                              "saved with save_pretrained, or at a hub id")
        return str(path)
    if _looks_like_path(name):
        raise ConfigError(f"model directory {name} not found: check the path given to --model")
    return name


def load_tokenizer(config: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    source = embedded_asset("tokenizer") if config.model is None else pretrained_source(config)
    try:
        cache_only_if_offline(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise load_error("a tokenizer for", source, error, CHECK_SOURCE) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of '{source}' has no eos token: set eos_token in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out of attention and loss anyway
    return tokenizer


def load_model_config(config: TrainConfig) -> Any:
    from transformers import AutoConfig

    source = embedded_asset("model") if config.model is None else pretrained_source(config)
    try:
        cache_only_if_offline(source)
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise load_error("model", source, error, CHECK_SOURCE) from None


def _text_config(model_config: Any) -> Any:
    return getattr(model_config, "get_text_config", lambda: model_config)()


def model_context(model_config: Any) -> int | None:
    return getattr(_text_config(model_config), "max_position_embeddings", None)


def model_vocab_size(model_config: Any) -> int | None:
    return getattr(_text_config(model_config), "vocab_size", None)


@dataclass
class LoadedModel:
    model: nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: run in the weights' dtype
    notes: list[str] = field(default_factory=list)  # what was decided and why, for the startup banner
    varlen_attention: bool = False  # packed rows run varlen flash attention: no layer builds an attention mask

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(logical_numel(p) for p in self.model.parameters())
        return total, sum(p.numel() for p in self.trainable_parameters)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _lora_targets(config: TrainConfig) -> str | list[str]:
    targets = config.lora_target_modules
    if not targets or targets == ["all-linear"]:  # PEFT's name for every linear layer but the head, as a string
        return "all-linear"
    if any(t.split(".")[-1] == "lm_head" for t in targets):
        raise ConfigError("LoRA on lm_head is not supported (the fused cross-entropy reads the head weight "
                          "directly): remove lm_head from --lora-target-modules")
    return targets


def quantized_load_kwargs(device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments of QLoRA's frozen base on ``device``: NF4 with double quantization, bf16 compute
    on a GPU (fp32 on CPU). Training and the merged export load the base through this, so they quantize it alike."""
    from transformers import BitsAndBytesConfig

    on_cuda = device.type == "cuda"
    return {"quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if on_cuda else torch.float32),
            "device_map": {"": device.index if on_cuda and device.index is not None else str(device)}}


def load_model(config: TrainConfig, model_config: Any, device: torch.device) -> LoadedModel:
    """Build the trainable model for ``config.finetune`` (already resolved)."""
    from transformers import AutoModelForCausalLM

    notes: list[str] = []
    on_cuda = device.type == "cuda"
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("--attn-implementation flash_attention_2 needs flash-attn: "
                          "pip install 'lamelm-fast[flash]', or use sdpa")
    if config.bf16 and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("--bf16 was given but this GPU has no bf16 support: drop --bf16")
    if config.bf16_weights and config.finetune != "full":
        raise ConfigError(f"--bf16-weights is for --finetune full; {config.finetune}'s frozen base is already in "
                          "bf16 (lora with --bf16) or 4-bit (qlora) and its adapters keep fp32: drop --bf16-weights")
    autocast_dtype = torch.bfloat16 if config.bf16 else None
    # Full fine-tuning: fp32 weights under autocast, or (bf16_weights) bf16 weights with fp32 masters in the optimizer.
    weights_dtype = torch.bfloat16 if config.bf16_weights else torch.float32
    load_kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation}

    if config.finetune == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--finetune qlora needs bitsandbytes: pip install bitsandbytes, "
                              "or use --finetune lora")
        if not on_cuda:
            notes.append("no CUDA device: QLoRA runs bitsandbytes 4-bit on the CPU with fp32 compute (slow)")
            autocast_dtype = None
        else:
            autocast_dtype = torch.bfloat16
        load_kwargs.update(quantized_load_kwargs(device))
        compute_dtype = load_kwargs["quantization_config"].bnb_4bit_compute_dtype
        notes.append(f"QLoRA: NF4 + double quantization, {str(compute_dtype).removeprefix('torch.')} compute")
    elif config.finetune == "lora" and config.bf16:
        load_kwargs["dtype"] = torch.bfloat16  # frozen base in bf16; adapters stay fp32
    else:
        load_kwargs["dtype"] = weights_dtype

    # Seeded before any weight is drawn (the embedded model's, LoRA's): a run is reproducible, and every rank
    # under torchrun builds the same initial weights (FSDP shards them as they are, without a broadcast).
    torch.manual_seed(config.seed)
    if config.model is None:
        model_config._attn_implementation = config.attn_implementation
        model = AutoModelForCausalLM.from_config(model_config, dtype=weights_dtype)
        if config.finetune == "qlora":  # its random weights, quantized as a saved model's are when loaded
            model = _reloaded(model, load_kwargs)
        notes.append("embedded default: a tiny Llama with random weights, so it is trained in full "
                     "(from scratch) unless --finetune says otherwise")
    else:
        source = pretrained_source(config)
        if offline := cache_only_if_offline(source):
            notes.append(f"{source} loaded from the local Hugging Face cache: {offline}")
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        except (OSError, ValueError) as error:
            raise load_error("model", source, error, CHECK_SOURCE) from None
    if "device_map" not in load_kwargs:
        model.to(device)
    keep_bnb_storage_layout(model)
    model.config.use_cache = False

    if config.finetune in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if config.finetune == "qlora":
            loaded_dtypes = {id(p): p.dtype for p in model.parameters()}
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            if autocast_dtype is not None:
                saved = narrow_frozen_lookup_weights(model, loaded_dtypes)
                if saved:
                    notes.append(f"frozen embedding and LM head kept in their 16-bit dtype, not PEFT's fp32 copy: "
                                 f"{saved / 1e9:.2f} GB less, the same numbers")
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model, config.gradient_checkpointing_policy,
                                            config.gradient_checkpointing_every_n_layers, config.compile)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=_lora_targets(config), task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:  # e.g. a target module name the model does not have
            names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                            if isinstance(module, nn.Linear)} - {"lm_head"})
            raise ConfigError(f"--lora-target-modules: {first_line(error)}; this model's linear layers are "
                              f"{','.join(names)} (or all-linear)") from None
        if config.model is None:
            notes.append("LoRA on the embedded model's random weights learns little: prefer --finetune full")
    else:
        for param in model.parameters():
            param.requires_grad_(True)
        if config.bf16_weights:
            notes.append("bf16 weights and gradients, fp32 master weights in the optimizer"
                         + (f"; gradients accumulate in bf16 over the {config.gradient_accumulation_steps} "
                            "micro-batches" if config.gradient_accumulation_steps > 1 else ""))
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model, config.gradient_checkpointing_policy,
                                            config.gradient_checkpointing_every_n_layers, config.compile)
    if config.gradient_checkpointing:
        every = config.gradient_checkpointing_every_n_layers
        which = "every decoder layer" if every == 1 else f"decoder layers 0, {every}, {2 * every}..."
        notes.append(f"activation checkpointing of {which}, policy {config.gradient_checkpointing_policy}"
                     + (": attention is not re-run in backward" if config.gradient_checkpointing_policy
                        == "keep_attention" else ""))
    # The loss is fused where the loop computes it (causal_lm_loss below); here the layers. QLoRA: the 4-bit base
    # and its adapter run as one op (dequantize inside the matmul, LoRA epilogue).
    report = patching.apply_kernels(model, cross_entropy=False, lora=config.finetune == "qlora")
    if config.finetune == "qlora":
        notes.append(f"fused 4-bit LoRA kernels on {report.lora_layers} layers")
    varlen = (config.packing and config.attn_implementation == "sdpa" and report.varlen_attention
              and autocast_dtype is not None and flash_device(device))
    if config.packing and config.attn_implementation == "sdpa":
        if varlen:
            how = "varlen flash attention, each sequence attending only to itself"
        elif report.varlen_attention and device.type == "cpu" and not config.compile:
            how = "one causal sdpa over the sequences padded to the longest, each attending only to itself"
        else:
            how = "sdpa over a block-diagonal mask"
        if not varlen:
            how += (" (varlen flash attention needs a CUDA GPU of compute capability 8.0+, bf16 compute and torch"
                    " >= 2.10)")
        notes.append(f"packed batches: {how}")
    if report.swiglu_mlps or report.rms_norms or report.rope_attentions:
        where = "Triton kernels" if resolve_backend(device) == "triton" else "their torch reference"
        notes.append(f"fused layers ({where}): RMSNorm x{report.rms_norms}, RoPE x{report.rope_attentions}, "
                     f"SwiGLU x{report.swiglu_mlps}")
    return LoadedModel(model, device, autocast_dtype, notes, varlen)


def _reloaded(model: nn.Module, load_kwargs: dict[str, Any]) -> nn.Module:
    """``model`` saved and loaded again with ``load_kwargs``: the way its weights get bitsandbytes' 4-bit storage."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="lamelm-embedded-") as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)


def narrow_frozen_lookup_weights(model: nn.Module, loaded_dtypes: dict[int, torch.dtype]) -> int:
    """Undo ``prepare_model_for_kbit_training``'s fp32 upcast of the frozen embedding and LM head (the bulk of what it
    upcasts: 0.5 GB more for Llama-3.2-1B, 2 GB for Llama-3-8B). Returns the bytes saved.

    It changes no number under bf16/fp16 autocast: the 16-bit values are exact in fp32, the fused loss casts the head
    weight to the autocast dtype anyway, and the embedding's output is cast to fp32 here, as the fp32 lookup gave it
    (the residual stream stays fp32). Only a plain ``nn.Embedding`` is narrowed: Gemma's scales its lookup in the
    weight's dtype, so it keeps its fp32 weight (and a head tied to it too)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    plain_embedding = type(embedding) is nn.Embedding
    saved = 0
    for module in (embedding, head):
        weight = getattr(module, "weight", None)
        original = loaded_dtypes.get(id(weight))
        if (weight is None or weight.requires_grad or original not in (torch.bfloat16, torch.float16)
                or weight.dtype == original or (weight is embedding.weight and not plain_embedding)):
            continue
        saved += weight.numel() * (weight.element_size() - original.itemsize)
        weight.data = weight.data.to(original)
        if weight is embedding.weight:
            embedding.register_forward_hook(lambda module, args, output: output.float())
    return saved


def keep_bnb_storage_layout(model: nn.Module) -> None:
    """Stop bitsandbytes (>= 0.49) from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16 it rewrites the weight storage the first time a layer runs without grad in eval mode.
    That breaks layers whose in_features is not a multiple of the blocksize (a reshape error), and our kernels and
    checkpoints read the standard layout, so the repack is switched off for every 4-bit layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# torch.compile's backend for --compile; tests set "aot_eager" (dynamo and AOT autograd, no C++ build).
COMPILE_BACKEND = "inductor"


def _built_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """A packed row's deferred attention mask, built before the layer's compiled forward (see compile_decoder_layers);
    once built, every later layer gets the same tensor."""
    mask = kwargs.get("attention_mask")
    return (args, {**kwargs, "attention_mask": mask.get()}) if isinstance(mask, DeferredMask) else None


def compile_decoder_layers(model: nn.Module, device: torch.device, build_mask_first: bool) -> str:
    """``torch.compile`` each decoder layer's forward in place; returns the banner's note.

    Layers, not the decoder: identical layers share one graph (compile time does not grow with depth; the decoder as
    one graph took 2.3x longer at 8 layers than at 2 on CPU), and HF's frozen-embedding hook that LoRA with gradient
    checkpointing adds (``requires_grad_`` on an output) stays out of the graph, where it broke it. The layer's
    ``forward`` (an instance attribute: state-dict keys unchanged) includes HF's activation checkpointing and its
    policy, and is compiled after DDP/FSDP2 wrapped the model (FSDP2's own subclass of the layer re-wraps ``forward``);
    module hooks (FSDP2's, the mask's below) run in eager around it, which ``layer.compile()`` would trace.
    ``dynamic=True``: packed and padded batches change length every step, so one dynamic graph from the first step
    rather than a static one and a recompile at the second.
    Where attention runs over a mask (no varlen flash attention), the mask the decoder defers is built in eager
    before the first layer: built inside a checkpointed, compiled layer it was a side effect that broke the graph.
    The fused loss runs as it is, in eager (``patching.lm_head_loss``)."""
    if COMPILE_BACKEND == "inductor" and device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            raise ConfigError("--compile on the CPU needs a C++ compiler for inductor's kernels: install g++ (or set "
                              "CXX), or drop --compile") from None
    decoder = patching.causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(f"--compile compiles the decoder layers and {type(decoder).__name__} has no .layers list: "
                          "drop --compile")
    for layer in layers:
        if build_mask_first:
            layer.register_forward_pre_hook(_built_mask, with_kwargs=True)
        layer.forward = torch.compile(layer.forward, backend=COMPILE_BACKEND, dynamic=True)
    return (f"torch.compile ({COMPILE_BACKEND}) of the {len(layers)} decoder layers, one graph for all; the first "
            "training step and the first evaluation include compiling, left out of tokens/s and MFU")


def lm_head(model: nn.Module) -> nn.Module:
    try:
        return patching.lm_head(model)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def causal_lm_loss(model: nn.Module, batch: Batch, num_items: int | None, autocast_dtype: torch.dtype | None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (sum over targets / num_items, or the plain sum if num_items is None) and correct-token count.

    The decoder gives hidden states and the fused linear cross-entropy takes them with the head weight, so the
    full [tokens, vocab] logits never exist.
    """
    causal_lm = patching.causal_lm(model)
    head = lm_head(model)
    with torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        hidden = causal_lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                                         **batch.attention_kwargs()).last_hidden_state
        loss, accuracy = patching.lm_head_loss(
            head, hidden, batch.labels, num_items=num_items if num_items is not None else 1,
            softcap=patching.final_logit_softcap(model), return_accuracy=True)
    return loss, accuracy * batch.num_targets


class CausalLMLoss(nn.Module):
    """The model and its loss as one module, so DDP and FSDP2 wrap the whole forward.

    Under FSDP2 this is the root unit: its forward gathers the root's parameters, the LM head weight among them,
    so the fused cross-entropy reads the whole weight and its gradient goes back to the shards in backward.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, batch: Batch, num_items: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss(self.model, batch, num_items, self.autocast_dtype)
