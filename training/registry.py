"""Training methods by name, for the run configuration and the engine.

A leaf module (it imports nothing of ours): :mod:`training.config` looks methods up here
without importing :mod:`training.methods`, which imports the configuration, so there is
no import cycle. ``training/methods/__init__.py`` registers every method;
:func:`registered_methods` imports it on first use (by name, so that ``ltzoo --help`` and
``ltzoo list``, which read recipes, never load torch).
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

#: method name -> :class:`training.methods.Method` subclass (typed there as such)
METHODS: dict[str, Any] = {}

_Class = TypeVar("_Class", bound=type)


def register_method(cls: _Class) -> _Class:
    """Make the method class ``cls`` available under its ``name`` (usable as a decorator)."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no method name")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = cls
    return cls


def registered_methods() -> dict[str, Any]:
    """Every registered method by name (the built-in ones are imported on the first call)."""
    importlib.import_module("ltzoo.training.methods")
    return METHODS
