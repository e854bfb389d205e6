"""From raw records to a finished data set: held-out split, balancing, and label statistics."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Optional

from .errors import BadInput
from .layout import LABEL_STATS, RAW
from .records import Record, iter_records, split_complete, write_split



@dataclass
class SplitConfig:
    """How a task's raw records become its train and test sets (every task's config extends this)."""

    eval_only_fields: ClassVar[tuple[str, ...]] = ()
    """The task's settings read only after its ground truth is made (eval's): changing one keeps the
    ground truth."""
    unset_keeps_hash: ClassVar[tuple[str, ...]] = ()
    """Settings that shape the ground truth only when set: while null they are left out of its hash, so
    ground truth made before the setting existed stays valid."""
    two_classes: ClassVar[bool] = True
    """Records are 'changed' or not: balancing evens the classes out and a train split of one class is
    refused. False for a task whose explanation is no class (a list of components): neither applies."""

    test_fraction: float = 0.2
    """Fraction of source prompts (original facts, for patching) held out for test, by a hash of the
    source id."""
    balance: bool = True
    """Subsample each split so changed and unchanged records are in the ratio changed_fraction; tasks
    with balancing cells (patching: token type x block) spread each class over them so no cell dominates."""
    changed_fraction: float = 0.5
    """Target share of 'changed' records after balancing."""
    max_train_records: Optional[int] = None
    """Cap on train records after balancing."""
    max_test_records: Optional[int] = None
    """Cap on test records after balancing."""
    max_unanswered_fraction: float = 0.2
    """Records whose answer could not be read from the target's output are dropped and counted; when
    more than this fraction of a set is unanswered the prompt format is wrong and the run stops."""
    near_tie_margin: float = 0.25
    """A decision whose top-two logits differ by less than this is a near-tie (bf16 rounding can flip
    it); label_stats counts them, for records that carry a logit margin (activation patching)."""
    drop_near_ties: bool = False
    """Leave near-tie records out of the train and test sets."""

    def check(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if not 0.0 < self.changed_fraction < 1.0:
            raise ValueError(f"changed_fraction: must be in (0, 1), got {self.changed_fraction}")
        if not 0.0 <= self.max_unanswered_fraction <= 1.0:
            raise ValueError(f"max_unanswered_fraction: must be in [0, 1], got {self.max_unanswered_fraction}")

    def label_settings(self) -> str:
        """The settings that shape this task's labels, named when a generated set is refused."""
        return "the prompt format"

    def usable(self, record: Record) -> bool:
        """Whether a raw record may enter a split: answered, with a non-empty answer before and after
        (an empty one would teach 'change to <<<>>>'), and no near-tie when those are dropped."""
        if record.query.get(UNANSWERED) or record.query.get(DROPPED) or empty_answer(record):
            return False
        margin = record.query.get(MARGIN)
        return not (self.drop_near_ties and margin is not None and margin < self.near_tie_margin)


UNANSWERED = "unanswered"
"""Query flag of a record whose answer could not be extracted from the target's output."""
DROPPED = "dropped"
"""Query field of a record its technique labelled unreliably, saying why (integrated gradients whose
completeness gap is past the tolerance): kept in the raw shards and counted, left out of the splits."""
MARGIN = "logit_margin"
"""Query field: the smaller top-two logit gap of the record's decisions (before and after)."""


class DegenerateSetError(BadInput, ValueError):
    """A generated set whose labels cannot train or test anything (answers not extracted, one class)."""


def empty_answer(record: Record) -> bool:
    """A causal record whose output before or after is empty (e.g. a whitespace token decoded)."""
    return not record.output_before.strip() or not record.output_after.strip()


def check_labels(stats: dict, cfg: SplitConfig, where: str) -> None:
    """Refuse a set whose raw records are mostly unanswered or whose train split has one class; the
    message carries the numbers and the settings to change."""
    raw, train = stats["raw"], stats.get("train", {})
    fraction = raw.get("unanswered_fraction", 0.0)
    if fraction > cfg.max_unanswered_fraction:
        raise DegenerateSetError(
            f"{where}: no answer could be read from the target's output for {raw['unanswered']} of {raw['count']} "
            f"raw records ({fraction:.0%}, above max_unanswered_fraction {cfg.max_unanswered_fraction}); "
            f"label_stats: {_summary(raw)}. Change {cfg.label_settings()} so the target answers in the expected form.")
    if cfg.two_classes and train.get("count") and train["changed_rate"] in (0.0, 1.0):
        which = "changed" if train["changed_rate"] == 1.0 else "unchanged"
        raise DegenerateSetError(
            f"{where}: every one of the {train['count']} train records is '{which}': an explainer learns nothing "
            f"from one class; label_stats: {_summary(raw)}. Change {cfg.label_settings()}, or use more sources.")


def _summary(stats: dict) -> str:
    keys = ("count", "unanswered", "changed_rate", "top_outputs_before", "top_outputs_after")
    return ", ".join(f"{k} {stats[k]}" for k in keys if k in stats)


def split_of(source_id: str, test_fraction: float, seed: int) -> str:
    """'test' or 'train' by a hash of the source id: every record of one source lands in one split."""
    digest = hashlib.sha256(f"{seed}:{source_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def source_splits(ctx) -> Callable[[str], str]:
    """split_of with a per-item task's settings: source id -> split, for a ground-truth context (its
    task_cfg's test_fraction and its seed)."""
    return lambda source: split_of(source, ctx.task_cfg.test_fraction, ctx.seed)


def stratified_sample(records: list[Record], n: int, cell_of: Optional[Callable[[Record], str]],
                      rng: random.Random) -> list[Record]:
    """n records at random; with cell_of, taken round-robin over cells so no cell dominates (a cell
    with few records gives all it has and the others fill the rest)."""
    if cell_of is None or n >= len(records):
        return rng.sample(records, min(n, len(records)))
    cells: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        cells[cell_of(r)].append(r)
    for members in cells.values():
        rng.shuffle(members)
    chosen: list[Record] = []
    while len(chosen) < n:
        for key in sorted(cells):
            if cells[key] and len(chosen) < n:
                chosen.append(cells[key].pop())
    return chosen


def balance(records: list[Record], changed_fraction: float, seed: int, cap: Optional[int] = None,
            cell_of: Optional[Callable[[Record], str]] = None) -> list[Record]:
    """Subsample so `changed` records make up `changed_fraction` (as near as the counts allow), then cap
    the total. With `cell_of`, the ratio holds within every cell, so that the cell alone predicts the
    label no better than the majority rate (a cell with one class gives nothing), and a cap takes from
    the cells in turn. The result is sorted by record id so it does not depend on arrival order."""
    rng = random.Random(seed)
    records = sorted(records, key=lambda r: r.record_id)
    if cell_of is None or len({r.changed for r in records}) < 2:  # one class only: nothing to balance against
        return sorted(_balanced_picks(records, changed_fraction, rng, cap), key=lambda r: r.record_id)
    cells: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        cells[cell_of(r)].append(r)
    # each cell's queue starts at its own phase of the ratio, so a cap that ends within the first rounds
    # keeps the ratio too (with every queue starting on a changed record, 12 of 20 cells gave 12 changed)
    queues = [_balanced_picks(cells[key], changed_fraction, rng, None, keep_single=False,
                              phase=(0.5 + i * changed_fraction) % 1.0) for i, key in enumerate(sorted(cells))]
    chosen: list[Record] = []
    while any(queues) and (cap is None or len(chosen) < cap):
        for queue in queues:
            if queue and (cap is None or len(chosen) < cap):
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda r: r.record_id)


def _balanced_picks(records: list[Record], changed_fraction: float, rng: random.Random, cap: Optional[int],
                    keep_single: bool = True, phase: float = 0.5) -> list[Record]:
    """The largest subsample in the ratio (capped), ordered so that every prefix keeps the ratio as near
    as it can (a cap on a merged queue cuts it evenly); `phase` in [0, 1) shifts where in the ratio the
    order starts (0.5: a changed record first at ratio 0.5). One class only: all of it if keep_single,
    else none."""
    changed = [r for r in records if r.changed]
    unchanged = [r for r in records if not r.changed]
    if not (changed and unchanged):
        return (rng.sample(records, min(cap, len(records))) if cap is not None else list(records)) if keep_single else []
    total = min(len(changed) / changed_fraction, len(unchanged) / (1 - changed_fraction))
    total = min(total, cap) if cap is not None else total
    picks = {True: rng.sample(changed, max(1, round(total * changed_fraction))),
             False: rng.sample(unchanged, max(1, round(total * (1 - changed_fraction))))}
    order, taken = [], {True: 0, False: 0}
    while taken[True] < len(picks[True]) or taken[False] < len(picks[False]):
        # the class furthest below its share of the picks so far goes next
        want = changed_fraction * (len(order) + 1) + phase - taken[True]
        label = taken[True] < len(picks[True]) and (want >= 1 or taken[False] >= len(picks[False]))
        order.append(picks[label][taken[label]])
        taken[label] += 1
    return order


def label_stats(records: list[Record], top: int = 10, cell_of: Optional[Callable[[Record], str]] = None,
                near_tie_margin: Optional[float] = None, identity_fields: tuple[str, ...] = (),
                with_screen: bool = True) -> dict:
    """Label distribution and how well trivial rules predict the label.

    `trivial_rules` gives, for each categorical query field (kind, hint letter, relation, ...), the
    accuracy of predicting `changed` from that field alone (majority per value), next to the overall
    majority rate. A rule far above the majority rate means the labels are explained by it. Fields that
    identify an input (`identity_fields`: a subject, the removed span) get no rule: one only memorises.
    with_screen=False leaves out the AtP screen's recall: it estimates something only over every record
    the screen kept, not over a split drawn from them by label.
    """
    n = len(records)
    if n == 0:
        return {"count": 0}
    unanswered = sum(bool(r.query.get(UNANSWERED)) for r in records)
    margins = [r.query[MARGIN] for r in records if r.query.get(MARGIN) is not None]
    quality = {"unanswered": unanswered, "unanswered_fraction": round(unanswered / n, 4),
               "empty_answers": sum(empty_answer(r) and not r.query.get(UNANSWERED) for r in records)}
    dropped = Counter(r.query[DROPPED] for r in records if r.query.get(DROPPED))
    if dropped:
        quality["dropped"] = dict(dropped)
    if margins and near_tie_margin is not None:
        quality["near_ties"] = sum(m < near_tie_margin for m in margins)
        quality["near_tie_margin"] = near_tie_margin
    changed = sum(r.changed for r in records)
    majority = max(changed, n - changed) / n
    rules = {}
    fields = sorted({k for r in records for k, v in r.query.items() if isinstance(v, str) and not k.startswith("raw_")
                     and k not in identity_fields})
    for key in fields:
        by_value: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            by_value[str(r.query.get(key))][r.changed] += 1
        if len(by_value) > max(2, n // 2):  # nearly unique per record: not a "trivial" rule
            continue
        rules[key] = round(sum(max(c.values()) for c in by_value.values()) / n, 4)
    cells = Counter(cell_of(r) for r in records) if cell_of else None
    from .attribution_patching import screen_stats  # torch and the patchers: only where records carry a screen

    screened = screen_stats(records) if with_screen and any(isinstance(r.query.get("screen"), dict) for r in records) \
        else None
    if cell_of:  # how well the balancing cell alone predicts the label (the majority rate: it tells nothing)
        by_cell: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            by_cell[cell_of(r)][r.changed] += 1
        rules["cell"] = round(sum(max(c.values()) for c in by_cell.values()) / n, 4)
    return {
        "count": n,
        **quality,
        "changed_rate": round(changed / n, 4),
        "majority_rate": round(majority, 4),
        "top_outputs_before": Counter(r.output_before for r in records).most_common(top),
        "top_outputs_after": Counter(r.output_after for r in records).most_common(top),
        "top_explanations": Counter(r.explanation for r in records).most_common(top),
        "trivial_rules": rules,
        **({"cells": dict(sorted(cells.items())), "largest_cell_share": round(max(cells.values()) / n, 4)}
           if cells else {}),
        **({"screen": screened} if screened else {}),
    }


def finalize(folder: Path, task_cfg, config_hash: str, seed: int, shard_size: int,
             cell_of: Optional[Callable[[Record], str]] = None, identity_fields: tuple[str, ...] = ()) -> dict:
    """Balance the raw records of a per-item task (folder/raw) into train/ and test/ shards; write
    label_stats.json; refuse a degenerate set (check_labels). cell_of and identity_fields are the task
    spec's balance_cell (e.g. token type x block) and identity_fields; a finished set is read back, not
    redone."""
    stats_path = folder / LABEL_STATS
    if stats_path.exists() and all(split_complete(folder / split, config_hash) for split in ("train", "test")):
        return json.loads(stats_path.read_text())
    records = list(iter_records(folder / RAW))
    stats_of = partial(label_stats, cell_of=cell_of, near_tie_margin=task_cfg.near_tie_margin,
                       identity_fields=identity_fields)
    stats = {"raw": stats_of(records)}
    usable = [r for r in records if task_cfg.usable(r)]  # unanswered (and, if asked, near-tie) records out
    chosen_by_split = {}
    for split, cap in (("train", task_cfg.max_train_records), ("test", task_cfg.max_test_records)):
        chosen = [r for r in usable if r.split == split]
        if task_cfg.balance and task_cfg.two_classes:
            chosen = balance(chosen, task_cfg.changed_fraction, seed, cap, cell_of)
        elif cap is not None:
            chosen = chosen[:cap]
        chosen_by_split[split] = chosen
        stats[split] = stats_of(chosen, with_screen=False)
    stats_path.write_text(json.dumps(stats, indent=1))  # kept for a refused set too: it is what to look at
    check_labels(stats, task_cfg, str(folder))
    for split, chosen in chosen_by_split.items():
        if not chosen:
            raise DegenerateSetError(f"{folder}: the {split} split is empty; use more sources or another test_fraction")
        write_split(folder / split, chosen, config_hash, shard_size)
    return stats
