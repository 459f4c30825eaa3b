"""Swapping a module's class in place for one with a fused forward mixed in front."""

from __future__ import annotations

import functools
from typing import Any

# What each mixed class was made of (mixin, base, prefix, as_base, attributes): how its instances pickle.
_RECIPES: dict[type, tuple[Any, ...]] = {}


def mixed_in_class(mixin: type, base: type, prefix: str, as_base: bool = False,
                   attributes: tuple[tuple[str, Any], ...] = ()) -> type:
    """``base`` with ``mixin`` in front, named ``prefix + base.__name__``, with class ``attributes`` (name, value);
    one class per arguments. ``as_base``: in ``base``'s own name, module and qualified name (prefix unused), its
    forward showing ``base.forward``'s signature, for a class that code outside looks at (HF reads a model's class
    name and forward signature).

    The class exists only in the process that patched, so pickle could not find it by name in another: its instances
    pickle as its recipe (the mixin over the base, a base mixed in its turn as its own recipe, down to classes
    importable by name), and unpickling builds the classes again.
    """
    return _mixed_in_class(mixin, base, prefix, as_base, attributes)  # one cache key however it is called


@functools.cache
def _mixed_in_class(mixin: type, base: type, prefix: str, as_base: bool, attributes: tuple[tuple[str, Any], ...],
                    ) -> type:
    def __reduce_ex__(self: Any, protocol: int) -> Any:
        if type(self) is not cls:  # a further subclass (FSDP's): pickled the default way
            return super(cls, self).__reduce_ex__(protocol)
        return _new_instance, (_recipe(cls),), self.__getstate__()

    namespace: dict[str, Any] = {"__module__": mixin.__module__, "__reduce_ex__": __reduce_ex__, **dict(attributes)}
    if as_base:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return mixin.forward(self, *args, **kwargs)

        namespace.update(__module__=base.__module__, __qualname__=base.__qualname__,
                         forward=functools.wraps(base.forward)(forward))
    cls = type(base.__name__ if as_base else f"{prefix}{base.__name__}", (mixin, base), namespace)
    _RECIPES[cls] = (mixin, base, prefix, as_base, attributes)
    return cls


def _recipe(cls: type) -> Any:
    if cls not in _RECIPES:
        return cls  # importable by name
    mixin, base, prefix, as_base, attributes = _RECIPES[cls]
    return (mixin, _recipe(base), prefix, as_base, attributes)


def _class_of(recipe: Any) -> type:
    if isinstance(recipe, type):
        return recipe
    mixin, base, prefix, as_base, attributes = recipe
    return _mixed_in_class(mixin, _class_of(base), prefix, as_base, attributes)


def _new_instance(recipe: Any) -> Any:
    cls = _class_of(recipe)
    return cls.__new__(cls)
