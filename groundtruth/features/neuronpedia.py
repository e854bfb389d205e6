"""Import of Neuronpedia explanation exports: the paper's labels for Llama Scope features.

An export is a JSON array (or JSON lines, optionally gzipped) of explanation objects as Neuronpedia's
/api/explanation/export returns them: {"modelId", "layer" (e.g. "12-llamascope-res-131k"), "index"
(the feature, a string), "description", ...}. The layer number is the integer the layer id starts with.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from ..errors import DataSourceError

_LAYER = re.compile(r"^(\d+)")


def _rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_neuronpedia(path: str) -> dict[tuple[int, int], list[str]]:
    """(layer, feature) -> descriptions, in file order. A row without a usable layer or index fails with its
    number; a row without a description is skipped."""
    file = Path(path)
    if not file.is_file():
        raise DataSourceError(f"Neuronpedia export {path} does not exist")
    table: dict[tuple[int, int], list[str]] = {}
    for i, row in enumerate(_rows(file)):
        try:
            layer_id, index, description = str(row["layer"]), int(row["index"]), row.get("description")
        except (KeyError, TypeError, ValueError) as err:
            raise DataSourceError(f"{path}: explanation {i} lacks a usable 'layer', 'index' or 'description' ({err!r})") from None
        match = _LAYER.match(layer_id)
        if not match:
            raise DataSourceError(f"{path}: explanation {i}: layer {layer_id!r} does not start with a layer number")
        if isinstance(description, str) and description.strip():  # a row without one is skipped, never "None"
            table.setdefault((int(match.group(1)), index), []).append(description.strip())
    return table
