"""The key-value cache's name in model calls and outputs. transformers renamed `past_key_values` to `cache`
(the pinned 5.2x warns on the old name and will drop it; the GPU image's 5.17 knows only the old one), so
every call that passes or reads a cache goes through these two helpers, which ask the model's own forward."""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def _name(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_kwargs(model, cache: Any) -> dict:
    """{name: cache} for model(...): `cache=` where the model's forward takes it, else `past_key_values=`."""
    return {_name(type(model)): cache}


def cache_of(output: Any) -> Any:
    """The cache a forward returned, under whichever name its output class declares."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values")
