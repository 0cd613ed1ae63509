"""Old names kept for one release: plugins written against them keep working, with a DeprecationWarning that
names the new one (README, "Words")."""

from __future__ import annotations

import functools
import importlib
import types
import warnings
from collections.abc import Callable
from typing import Any


def renamed(new: Callable[..., Any], old_name: str) -> Callable[..., Any]:
    """`new` under its old name: the same behaviour, and a DeprecationWarning at each call."""

    @functools.wraps(new)
    def old(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{old_name} is now {new.__name__}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return new(*args, **kwargs)

    old.__name__ = old.__qualname__ = old_name
    return old


def forward_to(package: str, module: str) -> Callable[[str], Any]:
    """A package's `__getattr__` (PEP 562) for a package that was one module, now `package.module`: its public
    names stay readable from the package for one release, each with a DeprecationWarning."""

    def __getattr__(name: str) -> Any:
        moved = importlib.import_module(f"{package}.{module}")
        value = getattr(moved, name, None)
        if not name.startswith("_") and value is not None and not isinstance(value, types.ModuleType):
            warnings.warn(f"{package}.{name} moved to {package}.{module}.{name}; the old name goes in the next "
                          "release", DeprecationWarning, stacklevel=2)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
