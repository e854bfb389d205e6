"""Import of Neuronpedia explanation exports: the paper's labels for Llama Scope features.

An export is a JSON array (or JSON lines, optionally gzipped) of explanation objects as Neuronpedia's
/api/explanation/export returns them: {"modelId", "layer" (e.g. "12-llamascope-res-131k"), "index"
(the feature, a string), "description", ...}. The layer number is the integer the layer id starts with.
write_neuronpedia writes labels in the same form (what `selfexplain explain` exports).
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataSourceError
from ..sources.fields import parse_json, parse_json_lines, text_field

_LAYER = re.compile(r"^(\d+)")


def _rows(path: Path) -> list:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (UnicodeDecodeError, OSError) as err:  # OSError: a .gz that is not gzip
        raise DataSourceError(f"{path}: not UTF-8 JSON text ({err})") from None
    if text.lstrip().startswith("["):
        return parse_json(text, str(path))
    return parse_json_lines(text, str(path))


def load_neuronpedia(path: str) -> dict[tuple[int, int], list[str]]:
    """(layer, feature) -> descriptions, in file order. Every row is checked: an object whose layer id starts
    with the layer number, whose index is a feature number, and whose description is a non-empty string;
    a file without one such row is an error, not an empty label set."""
    file = Path(path)
    if not file.is_file():
        raise DataSourceError(f"Neuronpedia export {path} does not exist")
    table: dict[tuple[int, int], list[str]] = {}
    for i, row in enumerate(_rows(file)):
        where = f"{path}: explanation {i}"
        if not isinstance(row, dict):
            raise DataSourceError(f"{where} must be an object, got {row!r}")
        layer, index = row.get("layer"), row.get("index")
        if isinstance(layer, int) and not isinstance(layer, bool):
            layer = str(layer)
        match = _LAYER.match(layer) if isinstance(layer, str) else None
        if match is None:
            raise DataSourceError(f"{where}: layer {layer!r} must be a layer id starting with its number, e.g. '12-res'")
        if not (isinstance(index, int) and not isinstance(index, bool) or isinstance(index, str) and index.isdigit()):
            raise DataSourceError(f"{where}: index {index!r} must be a feature number")
        description = text_field(row.get("description"), "description", where)
        table.setdefault((int(match.group(1)), int(index)), []).append(description.strip())
    if not table:
        raise DataSourceError(f"Neuronpedia export {path} holds no explanations")
    return table


@dataclass(frozen=True)
class FeatureLabel:
    """One feature's description, as an explanation export row holds it."""

    layer: int
    index: int
    description: str
    scores: dict[str, float] = field(default_factory=dict)
    """Score name -> value (e.g. a validation sample's simulation score)."""


def write_neuronpedia(path: Path, labels: list[FeatureLabel], model_id: str, sae_id: str, explanation_model: str) -> Path:
    """A JSON array of explanation objects as Neuronpedia's export has them: layer ids '<layer>-<sae_id>',
    indices as strings, the explainer named as the explanation model; load_neuronpedia reads it back."""
    rows = [{"modelId": model_id, "layer": f"{label.layer}-{sae_id}", "index": str(label.index),
             "description": label.description, "explanationModelName": explanation_model, "typeName": "selfexplain",
             "scores": [{"explanationScoreTypeName": name, "value": value} for name, value in label.scores.items()]}
            for label in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path
