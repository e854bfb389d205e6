"""Baselines that need no explainer model (a registry: name -> predictor(train, test) -> predictions)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from selfexplain.groundtruth.dataset import DegenerateSetError
from selfexplain.groundtruth.explanations import format_attribution, format_list, parse_list
from selfexplain.groundtruth.records import Record
from selfexplain.groundtruth.tasks import TaskSpec, task_spec


def majority_class(train: list[Record], test: list[Record]) -> list[str]:
    """Predict, for every test record, the most common explanation of the train split."""
    if not train:
        raise DegenerateSetError("majority baseline: the train split is empty")
    best, _ = Counter(r.explanation for r in train).most_common(1)[0]
    return [best] * len(test)


def nearest_neighbour(train: list[Record], test: list[Record]) -> list[str]:
    """Vector tasks: the explanation of the train record (same layers) whose vector has the largest dot
    product with the test vector (the paper's nearest-neighbour baseline for task A). A test record at
    layers no train record has (a small set balanced over many heads) searches every train record: the
    vectors all live in the residual stream."""
    if any(r.vector is None for r in train + test):
        raise ValueError("nearest_neighbour baseline: every record needs a vector (a vector task)")
    by_layers: dict[tuple, list[Record]] = {}
    for r in train:
        by_layers.setdefault(tuple(r.layers or ()), []).append(r)
    out = []
    for r in test:
        pool = by_layers.get(tuple(r.layers or ())) or train
        scores = np.stack([p.vector for p in pool]) @ r.vector
        out.append(pool[int(scores.argmax())].explanation)
    return out


def gold(train: list[Record], test: list[Record]) -> list[str]:
    """The gold explanations themselves: the ceiling (task A: the gold labels' own simulation score)."""
    return [r.explanation for r in test]


def last_word(train: list[Record], test: list[Record]) -> list[str]:
    """Attribution form: name the input's last word (the one next to the answer)."""
    return [format_attribution(r.query["words"][-1]) for r in test]


def subject_word(train: list[Record], test: list[Record]) -> list[str]:
    """Attribution form: name the subject's last word (where factual recall reads the attribute)."""
    return [format_attribution(r.query["subject_word"]) for r in test]


def head_prior(train: list[Record], test: list[Record]) -> list[str]:
    """List form: the items the train split names most often (for the heads question: the heads most
    often among a pair's top), as many as each test record's gold list holds, most frequent first."""
    counts = Counter(item for r in train for item in parse_list(r.explanation) or [])
    if not counts:
        raise DegenerateSetError("head_prior baseline: the train split names no items")
    ranked = [item for item, _ in counts.most_common()]
    return [format_list(ranked[:len(parse_list(r.explanation) or [])] or ranked[:1]) for r in test]


@dataclass(frozen=True)
class Baseline:
    predict: Callable[[list[Record], list[Record]], list[str]]
    applies: Callable[[TaskSpec], bool] = lambda spec: True
    """Whether the baseline means something for a task, by its capabilities; skipped for the others."""
    control: bool = True
    """A control a trained explainer must beat (the report's headline); false for a ceiling such as gold."""

    def applies_to(self, task: str) -> bool:
        return self.applies(task_spec(task))


BASELINES: dict[str, Baseline] = {
    "majority": Baseline(majority_class),
    "nearest_neighbour": Baseline(nearest_neighbour, lambda spec: spec.has_vectors),
    "gold": Baseline(gold, lambda spec: spec.explanation == "description", control=False),  # the ceiling
    "last_word": Baseline(last_word, lambda spec: spec.explanation == "attribution"),
    "subject_word": Baseline(subject_word, lambda spec: spec.explanation == "attribution"),
    "head_prior": Baseline(head_prior, lambda spec: spec.explanation == "list"),
}
"""Baseline name -> predictor(train records, test records) -> predictions, and which tasks it applies to."""
