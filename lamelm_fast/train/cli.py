"""``python -m lamelm_fast.train``: flags generated from TrainConfig, so CLI, YAML and Python share one schema."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from lamelm_fast.cli_parser import OneLineParser
from lamelm_fast.train.config import ConfigError, TrainConfig, from_mapping, load_yaml
from lamelm_fast.train.distributed import launched_rank


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m lamelm_fast.train",
        description="Fine-tune a causal LM. Flags are Hugging Face TrainingArguments names in kebab case.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave overlay the YAML and the defaults
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with the same keys as the flags")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type == "bool":
            # `--bf16` alone means true; `--bf16 false` and `--no-bf16` are accepted too (HF style).
            parser.add_argument(flag, nargs="?", const="true", metavar="BOOL", dest=f.name, help=text)
            parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_const", const="false",
                                dest=f.name, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags: each later layer wins."""
    args: dict[str, Any] = vars(build_parser().parse_args(argv))
    config = TrainConfig()
    if "config" in args:
        path = args.pop("config")
        config = from_mapping(load_yaml(path), source=str(path), base=config)
    return from_mapping(args, source="command line", base=config)


def main(argv: list[str] | None = None) -> int:
    from lamelm_fast.train.faults import TrainingStopped
    from lamelm_fast.train.loop import train

    # Under torchrun every rank meets the same error: rank 0 alone says it.
    say = print if launched_rank() == 0 else lambda *args, **kwargs: None
    try:
        config = parse_config(argv)
        train(config)
    except ConfigError as error:
        say(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        say(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0
