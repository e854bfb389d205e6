"""Where self vs cross can tell: per test record of a target, whether another model, as a target itself,
gives the same label for the same item (TaskSpec.same_item). Where both answer alike, an explainer of
either model can explain by simulating itself; a self-advantage is expected on the items where they differ."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from selfexplain.groundtruth.records import Record
from selfexplain.groundtruth.tasks import TASKS

AGREE, DISAGREE = "agree", "disagree"


def agreement(task: str, test: list[Record], other: Iterable[Record]) -> Optional[list[Optional[bool]]]:
    """Per test record: True where the other target's ground truth has the same item with the same label
    (explanation), False where its label differs, None where it lacks the item; None for a task whose
    items are a target's own."""
    same_item = TASKS[task.split(":")[0]].same_item
    if same_item is None:
        return None
    labels = {same_item(r): r.explanation for r in other}
    keys = [same_item(r) for r in test]
    return [None if k not in labels else labels[k] == r.explanation for k, r in zip(keys, test)]


def agreement_counts(flags: list[Optional[bool]]) -> dict[str, int]:
    counts = Counter(flags)
    return {AGREE: counts[True], DISAGREE: counts[False], "unmatched": counts[None]}


def subset(units: list, flags: list[Optional[bool]], want: bool) -> list:
    """The units of the records whose flag is `want` (units and flags in test-record order)."""
    return [u for u, f in zip(units, flags) if f is want]
