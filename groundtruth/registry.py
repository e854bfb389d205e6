"""One way to register a named component (a task, a row kind, a trained control): a name-keyed dict that
refuses a second item of the same name, so two modules cannot silently claim one name."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def register(registry: dict[str, T], item: T, what: str) -> T:
    """Add `item` to `registry` under `item.name`; `what` names the kind of item in the error."""
    name = item.name
    if name in registry:
        raise ValueError(f"{what} {name!r} is registered twice")
    registry[name] = item
    return item
