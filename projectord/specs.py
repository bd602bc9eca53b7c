"""Resolving `"module:attr"` configuration entries (the `projections` and `aggregates` keys).

`attr` may be dotted (`module:Class.attr`). A zero-argument callable (a function, not a class) is
called, so a config entry can name a factory. Problems raise the caller's error class with one line
naming the configuration key, for an operator.
"""

from __future__ import annotations

import importlib
from typing import Any


def resolve_spec(spec: str, key: str, error: type[Exception]) -> list[Any]:
    """The objects `spec` names, as a list: a list or tuple is returned as items, anything else as
    one item. A zero-argument function is called first."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise error(f"{key}: cannot import {module_name!r} ({spec}): {exc}") from None
    try:
        target: Any = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise error(f"{key}: {module_name!r} has no attribute {attr!r}") from None
    if callable(target) and not isinstance(target, type) and not isinstance(target, (list, tuple)):
        target = target()
    return list(target) if isinstance(target, (list, tuple)) else [target]
