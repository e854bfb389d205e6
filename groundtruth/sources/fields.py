"""Checks every loader of a published format applies to what it reads, so that a malformed file fails
naming the file, the record and the field, instead of yielding a wrong label or an empty set."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataSourceError


def text_field(value: Any, what: str, where: str) -> str:
    """`value` when it is a string with some non-space character; else an error naming `where` and `what`."""
    if not isinstance(value, str) or not value.strip():
        raise DataSourceError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


def parse_json(text: str, where: str) -> Any:
    """JSON text, or an error naming `where` (a file, or a file and line) and the syntax problem."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{where} is not valid JSON: {err}") from None


def parse_json_lines(text: str, where: str) -> list:
    """One JSON value per non-blank line; an error names `where` and the line number."""
    return [parse_json(line, f"{where}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_json(path: Path) -> Any:
    return parse_json(Path(path).read_text(encoding="utf-8"), str(path))
