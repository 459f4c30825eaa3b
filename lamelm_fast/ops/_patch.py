"""Swapping a module's class in place for one with a fused forward mixed in front."""

from __future__ import annotations

import functools
import sys


@functools.cache
def mixed_in_class(mixin: type, base: type, prefix: str) -> type:
    """``base`` with ``mixin`` in front, named ``prefix + base.__name__``; one class per pair, set as an attribute of
    the mixin's module so that a patched model still pickles (pickle finds classes by module and name)."""
    cls = type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
    setattr(sys.modules[mixin.__module__], cls.__name__, cls)
    return cls
