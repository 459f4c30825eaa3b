"""Hub ids while the Hugging Face hub is out of reach: the cached copy at once, or a clear error at once.

With no route to the hub, huggingface_hub retries each request with backoff, so a hub id took 30-50 s of retry
messages before transformers or datasets gave up with a generic network error, and PEFT asked again at every
checkpoint. One short probe answers first. Out of reach, the process goes into the libraries' own offline mode
(``HF_HUB_OFFLINE``, as if the user had set it): every loader, ours and the libraries' internal lookups alike, reads the
local cache only, for the rest of the run; :func:`offline_for_this_run` puts the libraries back as they were when the
run ends (a notebook's next cell asks the hub again).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lamelm_fast.train.config import ConfigError, first_line

PROBE_SECONDS = 5.0


@functools.cache
def offline_reason() -> str | None:
    """Why this process cannot use the hub (offline mode set, or no answer to one request), or None if it can."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception as error:  # DNS, refused, timeout, proxy: any failure to get an answer
        return f"{constants.ENDPOINT} cannot be reached ({type(error).__name__}: {first_line(error)})"
    return None


def _offline_for(source: str) -> str | None:
    return None if Path(source).expanduser().exists() else offline_reason()


def cache_only_if_offline(source: str) -> str | None:
    """Before loading a hub id: if the hub cannot be used, put the process in offline mode and say why (None for a
    local path or a usable hub)."""
    reason = _offline_for(source)
    if reason is not None:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # transformers and huggingface_hub read it at each call
        os.environ["HF_HUB_OFFLINE"] = "1"  # PEFT reads the variable, datasets when imported later
        if "datasets" in sys.modules:
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return reason


@contextlib.contextmanager
def offline_for_this_run() -> Iterator[None]:
    """Whatever offline mode :func:`cache_only_if_offline` sets inside ends with the block: the variable, the
    libraries' flags and the probe's answer are as before it."""
    from huggingface_hub import constants

    variable, flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    try:
        yield
    finally:
        if variable is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = variable
        constants.HF_HUB_OFFLINE = flag
        if "datasets" in sys.modules:  # (imported before the run, or during it with the variable set)
            sys.modules["datasets"].config.HF_HUB_OFFLINE = flag
        offline_reason.cache_clear()


def _files_missing(source: str, error: Exception, dataset: bool) -> bool:
    """Whether a load failed for want of cached files, not for what they hold (an architecture this transformers
    does not know, a wrong split...)."""
    if dataset:
        return isinstance(error, (ConnectionError, FileNotFoundError))  # datasets' "not reachable" and "not cached"
    from huggingface_hub import try_to_load_from_cache

    try:
        return not isinstance(try_to_load_from_cache(source, "config.json"), str)
    except ValueError:  # not a valid repo id either
        return True


def load_error(what: str, source: str, error: Exception, fix: str, dataset: bool = False) -> ConfigError:
    """The error for a failed load of ``what`` from ``source``: not in the cache, when the hub cannot be used and the
    files are missing; else the loader's own reason and ``fix``."""
    reason = _offline_for(source)
    if reason is None or not _files_missing(source, error, dataset):
        return ConfigError(f"could not load {what} '{source}': {first_line(error)}; {fix}")
    from huggingface_hub import constants

    download = f"hf download {source}" + (" --repo-type dataset" if dataset else "")
    return ConfigError(f"could not load {what} '{source}': it is not in the local Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) and {reason}: download it where the hub is reachable "
                       f"(`{download}`) and give its directory, or restore the network")
