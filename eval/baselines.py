"""Baselines that need no explainer model (a registry: name -> predictor)."""
from __future__ import annotations

from collections import Counter
from typing import Callable

from groundtruth.records import Record


def majority_class(train: list[Record], test: list[Record]) -> list[str]:
    """Predict, for every test record, the most common explanation of the train split."""
    if not train:
        raise ValueError("majority baseline: the train split is empty")
    best, _ = Counter(r.explanation for r in train).most_common(1)[0]
    return [best] * len(test)


BASELINES: dict[str, Callable[[list[Record], list[Record]], list[str]]] = {"majority": majority_class}
"""Baseline name -> predictor(train records, test records) -> predictions."""
