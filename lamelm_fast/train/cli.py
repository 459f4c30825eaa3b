"""``python -m lamelm_fast.train``: flags generated from TrainConfig, so CLI, YAML and Python share one schema.

This module imports neither torch nor transformers (about 2 s): :func:`main` does, once it can report a Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from typing import Any

from lamelm_fast.cli_parser import OneLineParser
from lamelm_fast.train.config import ConfigError, TrainConfig, close_settings, field_choices, from_mapping, load_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m lamelm_fast.train",
        description="Fine-tune a causal LM. Flags are Hugging Face TrainingArguments names in kebab case.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave overlay the YAML and the defaults
    )
    parser.add_argument("--config", metavar="FILE.yaml", action="append",
                        help="YAML file with the same keys as the flags; given again, each file overrides the earlier")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        if "default:" not in text:  # where the help explains a model-dependent default, None would only confuse
            text += f" (default: {default})"
        if f.type == "bool":
            # `--bf16` alone means true; `--bf16 false` and `--no-bf16` are accepted too (HF style).
            parser.add_argument(flag, nargs="?", const="true", metavar="BOOL", dest=f.name,
                                help=f"{text}; --no-{f.name.replace('_', '-')} for false")
            parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_const", const="false",
                                dest=f.name, help=argparse.SUPPRESS)
        else:
            choices = field_choices(f.name)
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(flag, dest=f.name, metavar=metavar, help=text)
    return parser


def _unknown_flag_error(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """argparse's "unrecognized arguments", with the flag we have for a name other tools use (--lr...)."""
    flag = next((arg for arg in unknown if arg.startswith("-")), None)
    if flag is None:
        parser.error(f"unexpected argument {unknown[0]!r}: every setting is a --flag")
    close = close_settings(flag.lstrip("-").split("=")[0].replace("-", "_"))
    hint = f" (did you mean {', '.join('--' + name.replace('_', '-') for name in close)}?)" if close else ""
    parser.error(f"unknown flag {flag.split('=')[0]}{hint}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML files in order, then the flags: each later layer wins."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flag_error(parser, unknown)
    args: dict[str, Any] = vars(namespace)
    config = TrainConfig()
    for path in args.pop("config", []):
        config = from_mapping(load_yaml(path), source=str(path), base=config)
    return from_mapping(args, source="command line", base=config)


def quiet_third_party_noise() -> None:
    """Two messages every CPU LoRA/QLoRA run would print that say nothing to the user: bitsandbytes' note that an
    optional CPU kernel package is absent (its own CPU code runs instead), and transformers 5.2x's deprecation of a
    property that PEFT reads."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun); readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    # Under torchrun every rank meets the same error, and torchrun hands a Ctrl-C to each: rank 0 alone says it.
    say = print if launched_rank() == 0 else lambda *args, **kwargs: None
    try:
        from lamelm_fast.train.faults import StoppedAtOnce, TrainingStopped
        from lamelm_fast.train.loop import train

        quiet_third_party_noise()
        try:
            train(parse_config(argv))
        except ConfigError as error:
            say(f"error: {error}", file=sys.stderr)
            return 2
        except TrainingStopped as stop:
            say(f"stopped: {stop}", file=sys.stderr)
            return stop.exit_code
        except StoppedAtOnce:  # a second Ctrl-C, or one after the last step: no traceback, and no save
            say("interrupted: stopped at once; nothing was saved since the last checkpoint", file=sys.stderr)
            return 130
        return 0
    except KeyboardInterrupt:  # importing torch, loading the model or the data: the loop had not taken Ctrl-C over
        say("Interrupted before training started: nothing to save.", file=sys.stderr)
        return 130
