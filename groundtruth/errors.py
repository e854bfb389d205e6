"""Bad input: one base class for everything a user can get wrong, so it is reported, not crashed on.

A config value, a model spec, a data source, a shard, a checkpoint or export: each has its subclass, and
each message names the key, file or model and says what to do. The `selfexplain` command prints a
BadInput (also one raised inside a Ray worker) as one line and exits 2; any other exception is a bug
and shows its traceback.
"""
from __future__ import annotations

from typing import Optional


class BadInput(Exception):
    """Something the user gave cannot be used."""


class ConfigError(BadInput, ValueError):
    """A config value that cannot be used; the message starts with the dotted path of the key."""


class DataSourceError(BadInput, ValueError):
    """A data file or folder a task reads is missing, empty or malformed."""


def bad_input_in(err: BaseException) -> Optional[BadInput]:
    """The BadInput behind an exception: itself, or one it wraps (a Ray task or actor error's cause,
    Ray Train's failure, an explicit `raise ... from`)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BadInput):
            cause = getattr(err, "cause", None)  # Ray's copy of a remote BadInput: its original
            return cause if isinstance(cause, BadInput) else err
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None
