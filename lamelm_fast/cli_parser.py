"""The argument parser of every ``python -m lamelm_fast...`` command."""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; our contract is one line naming the problem and the fix, exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No prefix matching: `--lr` must not quietly mean `--lr-scheduler-type`.
        super().__init__(*args, allow_abbrev=False, **kwargs)
        # A value such as -1e-3 is a (negative) number, not an unknown flag: argparse (3.11) knows -1 and -0.5 only.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")
