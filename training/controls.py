"""Controls that need an explainer of their own: trained on the same records with the evidence taken away.

An explainer that scores as well without the thing it is meant to read answers from the text alone. A
trained control is a record rewrite applied to the train records (the control's explainer is fine-tuned on
them) and to the test records (it is scored on them, against their own labels); which task it applies to
is decided by the task's capabilities. Adding one is one `register_trained_control` call; `eval.trained_controls`
names the ones a run trains, and eval/rows.py gives each its matrix row.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from selfexplain.groundtruth.records import Record
from selfexplain.groundtruth.registry import register
from selfexplain.groundtruth.taskspec import TaskSpec


@dataclass(frozen=True)
class TrainedControl:
    name: str
    label: str
    """The row's name after the explainer's, e.g. 'trained text-only'."""
    applies: Callable[[TaskSpec], bool]
    rewrite: Callable[[list[Record]], list[Record]]
    """The records as this control's explainer sees them, in training and in eval."""


TRAINED_CONTROLS: dict[str, TrainedControl] = {}


def register_trained_control(control: TrainedControl) -> TrainedControl:
    return register(TRAINED_CONTROLS, control, "trained control")


def without_vectors(records: list[Record]) -> list[Record]:
    """v removed: the [vec] triple leaves the prompt (the layers, token and text stay)."""
    return [dataclasses.replace(r, vector=None) for r in records]


def without_prompt(records: list[Record]) -> list[Record]:
    """The input's content removed: only the question (which still names the span) is left."""
    return [dataclasses.replace(r, prompt="") for r in records]


register_trained_control(TrainedControl(
    "text_only", "trained text-only", lambda spec: spec.has_vectors, without_vectors))
register_trained_control(TrainedControl(
    "question_only", "trained question-only", lambda spec: not spec.has_vectors, without_prompt))
