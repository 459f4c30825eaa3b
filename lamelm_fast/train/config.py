"""TrainConfig: the one typed config behind the CLI, YAML files and the Python API.

Field names are Hugging Face ``TrainingArguments`` names where one exists, so a HF user guesses every flag
(``--learning-rate``, ``--per-device-train-batch-size``...). A few fields default to ``None`` meaning "pick
for this model"; :func:`resolve` is the one place that decides them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

REPORT_TO = ("tensorboard", "wandb")

# What the embedded default trains with: a tiny model from random weights learns fast at a high LR.
EMBEDDED_LEARNING_RATE = 4e-3
ADAPTER_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 2e-5
EMBEDDED_MAX_SEQ_LENGTH = 256
MAX_SEQ_LENGTH_CAP = 2048


class ConfigError(ValueError):
    """A user error: the message names the problem and the fix. The CLI prints it on one line, exit 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message: third-party errors can be pages long."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    # Model
    model: str | None = field(default=None, metadata=_help(
        "HF hub id or local model directory; omitted: the embedded tiny Llama (trained from scratch)"))
    finetune: Literal["qlora", "lora", "full"] | None = field(default=None, metadata=_help(
        "qlora (NF4 base + LoRA), lora or full; default: full for the embedded model, qlora otherwise"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    lora_target_modules: list[str] | None = field(default=None, metadata=_help(
        "module names to adapt (comma separated); default: every linear projection except the LM head"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    gradient_checkpointing_policy: Literal["full", "keep_attention"] = field(default="full", metadata=_help(
        "with --gradient-checkpointing: full re-runs each decoder layer in backward (HF's behaviour, least "
        "memory); keep_attention also keeps each layer's attention output, so backward does not re-run attention "
        "(+ tokens x hidden in the compute dtype per layer); saves most at long rows (the attention forward grows "
        "with the square of the row)"))
    gradient_checkpointing_every_n_layers: int = field(default=1, metadata=_help(
        "with --gradient-checkpointing: checkpoint only layers 0, n, 2n... (1: every layer); the others keep their "
        "activations, which trades memory back for the recompute's time"))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision (bf16 compute, fp32 master weights)"))
    bf16_weights: bool = field(default=False, metadata=_help(
        "with --bf16 and --finetune full: the model's weights and gradients in bf16 and their fp32 master copies in "
        "the optimizer (updated in its fused pass), instead of fp32 weights under autocast: no weight casts in "
        "forward and backward, 2 bytes less per parameter"))
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = field(default="sdpa", metadata=_help(
        "attention implementation passed to transformers"))
    kernels: Literal["auto", "cuda", "triton", "torch"] = field(default="auto", metadata=_help(
        "fused-op backend: auto = CUDA extension, else Triton on a GPU, else the torch reference (on CPU); "
        "auto also honours the LAMELM_KERNELS environment variable"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile each decoder layer (inductor; one graph shared by the layers, dynamic shapes); the fused loss "
        "runs as it is. The first training step and the first evaluation include compiling (left out of tokens/s)"))
    distributed: Literal["auto", "ddp", "fsdp"] = field(default="auto", metadata=_help(
        "under torchrun: ddp (a full replica per GPU) or fsdp (FSDP2, weights, gradients and optimizer state "
        "sharded); auto = fsdp when DDP would fill over half of a GPU with them, else ddp"))
    # Data
    dataset: str | None = field(default=None, metadata=_help(
        "local jsonl/json/parquet/csv/txt file, a dataset directory (save_to_disk, or data files) or HF datasets id; "
        "omitted: the embedded stdlib instruction set"))
    dataset_format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = field(
        default="auto", metadata=_help(
            "record format: alpaca (instruction/input/output), chat (messages, or ShareGPT conversations), "
            "prompt_completion (TRL's prompt/completion: strings, or lists of messages), text; auto detects"))
    dataset_split: str = field(default="train", metadata=_help("split to load from a HF datasets id"))
    max_seq_length: int | None = field(default=None, metadata=_help(
        "truncate examples to this many tokens; default: min(model context, 2048), 256 for the embedded model"))
    packing: bool = field(default=True, metadata=_help(
        "padding-free batches: sequences concatenated, positions restart, no attention across sequences"))
    train_on_prompt: bool = field(default=False, metadata=_help("also compute the loss on prompt tokens"))
    eval_split_ratio: float = field(default=0.05, metadata=_help("fraction of examples held out for validation"))
    shuffle: bool = field(default=True, metadata=_help("shuffle training examples each epoch"))
    # Optimisation
    learning_rate: float | None = field(default=None, metadata=_help(
        "peak learning rate; default: 4e-3 embedded model, 2e-4 (q)lora, 2e-5 full"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip gradients to this global L2 norm; 0 = off"))
    lr_scheduler_type: str = field(default="cosine", metadata=_help(
        "linear, cosine, constant, constant_with_warmup, cosine_with_restarts, polynomial, inverse_sqrt"))
    warmup_ratio: float = field(default=0.03, metadata=_help("fraction of steps for linear warmup"))
    warmup_steps: int = field(default=0, metadata=_help("warmup steps (overrides --warmup-ratio when > 0)"))
    per_device_train_batch_size: int = field(default=4, metadata=_help("sequences per micro-batch"))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("sequences per eval batch"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    num_train_epochs: float = field(default=1.0, metadata=_help("epochs (fractions allowed)"))
    max_steps: int = field(default=-1, metadata=_help("optimizer steps; > 0 overrides --num-train-epochs"))
    seed: int = field(default=42, metadata=_help("seed for init, data order and dropout"))
    # Reporting and checkpoints
    output_dir: str = field(default="output", metadata=_help("run directory: checkpoints, metrics, summary"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "start afresh in an --output-dir that holds an earlier run's checkpoints, deleting them"))
    logging_steps: int = field(default=10, metadata=_help("log every N optimizer steps"))
    eval_steps: int | None = field(default=None, metadata=_help("evaluate every N steps; default: end of run"))
    save_steps: int | None = field(default=None, metadata=_help("checkpoint every N steps; always at the end"))
    save_total_limit: int | None = field(default=None, metadata=_help("keep at most N checkpoints"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "checkpoint directory to resume from, or 'latest' for the newest intact one in --output-dir"))
    ignore_data_change: bool = field(default=False, metadata=_help(
        "resume even if the training data differs from the checkpoint's (refused by default)"))
    max_consecutive_skipped_steps: int = field(default=10, metadata=_help(
        "stop when this many optimizer steps in a row were skipped for a non-finite gradient (checked at "
        "logging steps); 0 = never stop"))
    quiet: bool = field(default=False, metadata=_help("no per-step table, only errors and the summary"))
    log_format: Literal["table", "json"] = field(default="table", metadata=_help(
        "console output: a table with a progress bar, or one JSON object per line on stdout (for scripts)"))
    report_to: list[str] | None = field(default=None, metadata=_help(
        "also log to: tensorboard, wandb (comma separated; needs pip install 'lamelm-fast[tracking]')"))
    peak_tflops: float | None = field(default=None, metadata=_help(
        "device peak bf16 TFLOP/s for MFU; default: looked up from the GPU name"))
    early_stopping_patience: int | None = field(default=None, metadata=_help(
        "stop after N evaluations without a new best validation loss; the best checkpoint is kept"))
    eval_samples: int = field(default=0, metadata=_help(
        "at each evaluation, the model's greedy completion of the first N validation prompts, beside their "
        "reference answers, written to metrics.jsonl ('sample' rows; the first one printed); 0 = none"))


# Names other trainers and scripts use for our settings: an unknown key among them gets our name as its hint.
ALIASES = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs",
           "num_epochs": "num_train_epochs", "grad_accum": "gradient_accumulation_steps",
           "gradient_accumulation": "gradient_accumulation_steps", "warmup": "warmup_ratio", "steps": "max_steps",
           "output": "output_dir", "data": "dataset", "model_name_or_path": "model", "base_model": "model",
           "seq_len": "max_seq_length", "sequence_len": "max_seq_length", "max_length": "max_seq_length",
           "lora_rank": "lora_r", "target_modules": "lora_target_modules", "scheduler": "lr_scheduler_type"}


def close_settings(name: str) -> list[str]:
    """The settings an unknown name most likely meant: ours for another tool's name (ALIASES), else a near spelling,
    else those sharing its first word."""
    if name in ALIASES:
        return [ALIASES[name]]
    known = field_names()
    return (difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            or sorted(k for k in known if k.split("_")[0] == name.split("_")[0]))


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _bool_from(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def field_choices(name: str) -> tuple[str, ...]:
    """The values a Literal field allows (empty for other fields)."""
    kind = _field_types()[name]
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) is Literal or (args and get_origin(args[0]) is Literal):
        return get_args(kind if get_origin(kind) is Literal else args[0])
    return ()


def coerce_value(name: str, value: Any) -> Any:
    """Convert a CLI string or YAML value to the field's type; raise ConfigError naming the field."""
    kind = _field_types()[name]
    args = [a for a in get_args(kind) if a is not type(None)]
    optional = type(None) in get_args(kind)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    choices = field_choices(name)
    if choices:
        if value not in choices:
            raise ConfigError(f"{name}: invalid value {value!r}; choose one of {', '.join(choices)}")
        return value
    base = args[0] if args else kind
    if get_origin(base) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{name}: expected a list of names, got {value!r}")
        return [i.strip() for i in items if i.strip()]
    if base is bool:
        return _bool_from(value, name)
    try:
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {base.__name__}, got {value!r}") from None
    return str(value)


def from_mapping(values: dict[str, Any], source: str, base: TrainConfig | None = None) -> TrainConfig:
    """Overlay ``values`` (YAML or CLI keys, kebab or snake case) on ``base``; unknown keys are errors."""
    known = set(field_names())
    updates, spelled = {}, {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            close = [name.replace("_", "-") if "-" in str(raw_key) else name for name in close_settings(key)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting '{raw_key}'{hint}")
        if key in spelled:  # max_steps and max-steps in one YAML file: which one was meant?
            raise ConfigError(f"{source}: '{spelled[key]}' and '{raw_key}' are the same setting: keep one")
        spelled[key] = raw_key
        try:
            updates[key] = coerce_value(key, value)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return dataclasses.replace(base or TrainConfig(), **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}")
    return data


def check_trackers(names: list[str]) -> None:
    """Each --report-to destination's package is installed (checked before a run writes anything)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: pip install 'lamelm-fast[tracking]'")


def checked(config: TrainConfig) -> TrainConfig:
    """A TrainConfig built in Python, through the coercion the CLI and YAML values get: a choice outside a field's
    choices, or a value of the wrong type, raises ConfigError naming the field (a dataclass checks neither)."""
    return from_mapping(dataclasses.asdict(config), source="TrainConfig")


def validate(config: TrainConfig) -> None:
    """Range checks that the type system cannot express. Raises ConfigError naming the field and the fix."""
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "lora_r", "gradient_checkpointing_every_n_layers"]
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("eval_steps", "save_steps", "save_total_limit", "max_seq_length", "early_stopping_patience"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 (or omitted), got {value}")
    # 0 is allowed, as in HF (a frozen dry run); the health check then says the model is not learning.
    if config.learning_rate is not None and not (config.learning_rate >= 0 and math.isfinite(config.learning_rate)):
        raise ConfigError(f"learning_rate must be a finite number >= 0, got {config.learning_rate}")
    if not 0.0 <= config.eval_split_ratio < 1.0:
        raise ConfigError(f"eval_split_ratio must be in [0, 1), got {config.eval_split_ratio}")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1], got {config.warmup_ratio}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if config.warmup_steps < 0 or config.max_consecutive_skipped_steps < 0:
        raise ConfigError("warmup_steps and max_consecutive_skipped_steps must be >= 0")
    # A NaN or inf here would train silently wrong (or crash deep inside), so they are refused by name.
    for name in ("max_grad_norm", "weight_decay", "adam_epsilon"):
        if not (getattr(config, name) >= 0 and math.isfinite(getattr(config, name))):
            raise ConfigError(f"{name} must be a number >= 0, got {getattr(config, name)}")
    if not (config.lora_alpha > 0 and math.isfinite(config.lora_alpha)):
        raise ConfigError(f"lora_alpha must be a number > 0, got {config.lora_alpha}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
    unknown = sorted(set(config.report_to or []) - set(REPORT_TO))
    if unknown:
        raise ConfigError(f"report_to: unknown destination {unknown[0]!r}; choose from {', '.join(REPORT_TO)}")
    check_trackers(config.report_to or [])
    if config.peak_tflops is not None and not (config.peak_tflops > 0 and math.isfinite(config.peak_tflops)):
        raise ConfigError(f"peak_tflops must be > 0, got {config.peak_tflops}")
    if config.eval_samples < 0:
        raise ConfigError(f"eval_samples must be >= 0, got {config.eval_samples}")
    if config.eval_samples and not config.eval_split_ratio > 0:
        raise ConfigError("eval_samples completes validation prompts: set --eval-split-ratio > 0, or drop "
                          "--eval-samples")
    if config.early_stopping_patience and not (config.eval_split_ratio > 0 and config.eval_steps):
        raise ConfigError("early_stopping_patience needs evaluations: set --eval-steps and --eval-split-ratio > 0")
    if config.max_steps <= 0 and not (config.num_train_epochs > 0 and math.isfinite(config.num_train_epochs)):
        raise ConfigError("set num_train_epochs to a finite number > 0, or max_steps > 0: as given the run would "
                          "train 0 (or endless) steps")
    if config.bf16_weights and not config.bf16:
        raise ConfigError("bf16_weights holds the weights in bf16 for bf16 compute: add --bf16, or drop --bf16-weights")
    if not config.gradient_checkpointing:
        for name, default in (("gradient_checkpointing_policy", "full"), ("gradient_checkpointing_every_n_layers", 1)):
            if getattr(config, name) != default:
                raise ConfigError(f"{name} applies to checkpointed layers: add --gradient-checkpointing, or drop "
                                  f"--{name.replace('_', '-')}")
    if config.gradient_checkpointing_policy == "keep_attention":
        if config.attn_implementation == "eager":
            raise ConfigError("gradient_checkpointing_policy keep_attention keeps the output of a fused attention op "
                              "and eager attention has none: use --attn-implementation sdpa, or the policy full")
    # Imported here: the optimizers need torch (~2 s), which the command line imports only once it can report a Ctrl-C.
    from lamelm_fast.optim import LR_SCHEDULER_TYPES

    if config.lr_scheduler_type not in LR_SCHEDULER_TYPES:
        raise ConfigError(f"lr_scheduler_type: invalid value {config.lr_scheduler_type!r}; "
                          f"choose one of {', '.join(LR_SCHEDULER_TYPES)}")


def unused_settings(config: TrainConfig) -> list[str]:
    """Settings the user changed that this (resolved) run does not use, for the banner: silence would suggest they
    did something."""
    defaults = TrainConfig()
    notes = []
    if config.finetune == "full":
        lora = [f"--{name.replace('_', '-')}" for name in ("lora_r", "lora_alpha", "lora_dropout",
                                                            "lora_target_modules")
                if getattr(config, name) != getattr(defaults, name)]
        if lora:
            notes.append(f"{', '.join(lora)} apply to LoRA and QLoRA: not used by --finetune full")
    if config.eval_split_ratio == 0 and config.eval_steps:
        notes.append("--eval-steps does nothing without a validation set: set --eval-split-ratio > 0")
    return notes


def empty_validation_note(config: TrainConfig, train_examples: int, eval_examples: int) -> str | None:
    """What to say when --eval-split-ratio > 0 held out nothing (one example with targets: it is kept for training);
    a ConfigError when a setting needs evaluations, as with --eval-split-ratio 0."""
    if not config.eval_split_ratio > 0 or eval_examples:
        return None
    why = (f"--eval-split-ratio {config.eval_split_ratio:g} holds out no validation example: the data has "
           f"{train_examples} example with targets, kept for training")
    needs = [f"--{name.replace('_', '-')}" for name in ("early_stopping_patience", "eval_samples")
             if getattr(config, name)]
    if needs:
        raise ConfigError(f"{why}, so {' and '.join(needs)} would have nothing to evaluate: add examples, or drop "
                          f"{' and '.join(needs)}")
    return f"{why}: no evaluation" + (" (--eval-steps does nothing)" if config.eval_steps else "")


def resolve(config: TrainConfig, model_context: int | None = None) -> TrainConfig:
    """Fill the model-dependent ``None`` defaults. The one place these choices are made."""
    embedded = config.model is None
    finetune = config.finetune or ("full" if embedded else "qlora")
    if config.learning_rate is not None:
        learning_rate = config.learning_rate
    elif embedded:
        learning_rate = EMBEDDED_LEARNING_RATE
    else:
        learning_rate = FULL_LEARNING_RATE if finetune == "full" else ADAPTER_LEARNING_RATE
    max_seq_length = config.max_seq_length
    if max_seq_length is None:
        cap = EMBEDDED_MAX_SEQ_LENGTH if embedded else MAX_SEQ_LENGTH_CAP
        max_seq_length = min(cap, model_context) if model_context else cap
    elif model_context and max_seq_length > model_context:
        raise ConfigError(f"max_seq_length {max_seq_length} is longer than the model's context ({model_context} "
                          f"positions): set --max-seq-length {model_context} or less")
    # A local model directory is recorded absolute (checkpoints, PEFT's adapter_config.json), so that resuming,
    # exporting and loading an adapter work from any working directory.
    model = config.model
    if model is not None and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    return dataclasses.replace(config, model=model, finetune=finetune, learning_rate=learning_rate,
                               max_seq_length=max_seq_length)
