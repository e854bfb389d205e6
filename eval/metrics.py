"""Scores of generated explanations, each with a bootstrap 95% interval: causal ones (exact match, has-changed
macro-F1, content match, also within each gold class), descriptions (judge, simulation, discriminative
rank), attributions (exact match, recall@k) and lists (top-1, precision@k, recall@k). Which a task gets is its form (eval/forms.py)."""
from __future__ import annotations

import random
from typing import Callable, NamedTuple, Optional

import numpy as np

from selfexplain.groundtruth.explanations import WORD_EDGES, parse_attribution, parse_explanation, parse_list
from selfexplain.groundtruth.records import Record


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


BOOTSTRAP_RESAMPLES = 1000  # percentile ends of a 95% interval move by under 0.01 beyond this at 20-200 records


def with_intervals(units: list, aggregate: Callable[[list], dict], metrics: tuple[str, ...], seed: int = 0) -> dict:
    """aggregate(units) plus a bootstrap 95% interval of each metric (<metric>_lo, <metric>_hi): the units
    (one per test record, or per feature) resampled with replacement BOOTSTRAP_RESAMPLES times, seeded."""
    out = aggregate(units)
    if not units:
        return out
    rows = np.random.default_rng(seed).integers(0, len(units), size=(BOOTSTRAP_RESAMPLES, len(units)))
    draws = [aggregate([units[i] for i in row]) for row in rows]
    for metric in metrics:
        values = np.array([d[metric] for d in draws if d.get(metric) is not None], dtype=float)
        if len(values):
            out[f"{metric}_lo"], out[f"{metric}_hi"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    return out


class Outcome(NamedTuple):
    """One causal prediction against its record."""

    gold_changed: bool
    predicted_changed: Optional[bool]  # None: unparseable
    exact: bool
    content: bool


def outcomes(predictions: list[str], records: list[Record]) -> list[Outcome]:
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    out = []
    for text, rec in zip(predictions, records):
        gold, pred = parse_explanation(rec.explanation), parse_explanation(text)
        out.append(Outcome(rec.changed, None if pred is None else pred[0],
                           pred is not None and pred == gold, pred is not None and pred[1] == gold[1]))
    return out


def causal_from_units(units: list) -> dict:
    """Exact match, has-changed macro-F1 (an unparseable answer counts as the class opposite to gold),
    content match and parse rate; exact and content match also within each gold class. A unit is an
    Outcome or its fields in order (a cell's saved units), read in one pass: the paired bootstrap calls
    this a thousand times per comparison."""
    n = len(units)
    if n == 0:
        return {"n": 0}
    confusion = {(g, p): 0 for g in (True, False) for p in (True, False)}
    counts = {gold: [0, 0, 0] for gold in (True, False)}  # records, exact, content per gold class
    parsed = 0
    for gold, predicted, exact, content in units:
        confusion[(gold, predicted if predicted is not None else not gold)] += 1
        parsed += predicted is not None
        mine = counts[gold]
        mine[0] += 1
        mine[1] += exact
        mine[2] += content
    f1_changed = _f1(confusion[(True, True)], confusion[(False, True)], confusion[(True, False)])
    f1_unchanged = _f1(confusion[(False, False)], confusion[(True, False)], confusion[(False, True)])
    metrics = {"n": n, "exact_match": (counts[True][1] + counts[False][1]) / n,
               "changed_macro_f1": (f1_changed + f1_unchanged) / 2,
               "content_match": (counts[True][2] + counts[False][2]) / n, "parse_rate": parsed / n}
    for name, gold in (("changed", True), ("unchanged", False)):
        records, exact, content = counts[gold]
        metrics[f"n_{name}"] = records
        metrics[f"exact_match_{name}"] = exact / records if records else None
        metrics[f"content_match_{name}"] = content / records if records else None
    return metrics


CAUSAL_METRICS = ("exact_match", "changed_macro_f1", "content_match", "content_match_changed", "parse_rate")
"""Headline first; content match on records whose output did change is where reading v shows most."""
DESCRIPTION_METRICS = ("top1", "mean_rank", "judge", "simulation")
"""top1 first: the judge compresses its range (majority baselines 0.66-0.72), the discriminative rank does not."""
CAUSAL_INTERVAL_METRICS = CAUSAL_METRICS + ("exact_match_changed", "exact_match_unchanged", "content_match_unchanged")


def causal_units(predictions: list[str], records: list[Record]) -> list[list]:
    """One unit per record, as JSON: [gold changed, predicted changed or None, exact, content]."""
    return [[o.gold_changed, o.predicted_changed, o.exact, o.content] for o in outcomes(predictions, records)]


def score(predictions: list[str], records: list[Record]) -> dict:
    """Metrics of causal predictions against gold records, each with its bootstrap 95% interval over
    records. Unparseable output counts as wrong everywhere."""
    return with_intervals(causal_units(predictions, records), causal_from_units, CAUSAL_INTERVAL_METRICS)


def mean_scores(units: list[list[float]]) -> dict:
    """Per feature [judge, simulation, rank of the true feature among the K+1 candidates (0: first), K+1]."""
    if not units:
        return {"n": 0}
    n = len(units)
    return {"n": n, "judge": sum(u[0] for u in units) / n, "simulation": sum(u[1] for u in units) / n,
            "top1": sum(u[2] == 0 for u in units) / n, "mean_rank": sum(u[2] + 1 for u in units) / n,
            "top1_chance": sum(1 / u[3] for u in units) / n}


def discriminative_rank(simulator, description: str, own, others: list) -> int:
    """Where the true feature's exemplars rank among others' by the simulation score of `description`
    (0: first; a tie counts against the true feature, so a description that fits nothing ranks last)."""
    from selfexplain.groundtruth.features.simulators import simulation_score

    mine = simulation_score(simulator, description, own)
    return sum(simulation_score(simulator, description, ex) >= mine for ex in others)


def description_units(predictions: list[str], records: list[Record], judge, simulator, k: int = 9) -> list[list]:
    """Per feature: the judge's 0..1 similarity to the gold description, the simulation score on its own
    exemplars, and its rank among K other test features' exemplars (seeded choice per feature), and K+1."""
    from selfexplain.groundtruth.features.exemplars import FeatureExemplars
    from selfexplain.groundtruth.features.simulators import simulation_score

    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    exemplars = [FeatureExemplars.from_json(r.query["exemplars"]) for r in records]
    grades = judge.grade([p.strip() for p in predictions], [r.explanation for r in records])
    units = []
    for i, (text, record, own) in enumerate(zip(predictions, records, exemplars)):
        others = [j for j in range(len(records)) if j != i]
        others = random.Random(record.record_id).sample(others, min(k, len(others)))
        units.append([grades[i], simulation_score(simulator, text.strip(), own),
                      discriminative_rank(simulator, text.strip(), own, [exemplars[j] for j in others]), len(others) + 1])
    return units


def score_descriptions(predictions: list[str], records: list[Record], judge, simulator, k: int = 9) -> dict:
    """Task A: judge, simulation, and the discriminative top-1 accuracy and mean rank (chance: top1_chance),
    averaged over features, each with its bootstrap 95% interval over features."""
    return with_intervals(description_units(predictions, records, judge, simulator, k), mean_scores,
                          DESCRIPTION_METRICS)


ATTRIBUTION_METRICS = ("exact_match", "recall_at_k", "parse_rate")
"""exact_match: the named word is the top word; recall_at_k: it is among the record's top words."""


def _word(text: Optional[str]) -> Optional[str]:
    return None if text is None else text.strip().strip(WORD_EDGES).casefold()


def attribution_units(predictions: list[str], records: list[Record]) -> list[list]:
    """One unit per record, as JSON: [parsed, exact, in the top k]."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    units = []
    for text, record in zip(predictions, records):
        named, top = _word(parse_attribution(text)), [_word(w) for w in record.query["top_words"]]
        units.append([named is not None, named is not None and named == top[0], named is not None and named in top])
    return units


def attribution_from_units(units: list) -> dict:
    n = len(units)
    if n == 0:
        return {"n": 0}
    return {"n": n, "parse_rate": sum(u[0] for u in units) / n, "exact_match": sum(u[1] for u in units) / n,
            "recall_at_k": sum(u[2] for u in units) / n}


LIST_METRICS = ("recall_at_k", "precision_at_k", "top1", "parse_rate")
"""With k the gold list's length and the explainer's first k items: recall_at_k, the share of the gold
items named; precision_at_k, the share of the items named that are gold; top1, the first item named is
the gold first. An answer not in the form scores 0 on each."""


def list_units(predictions: list[str], records: list[Record]) -> list[list]:
    """One unit per record, as JSON: [parsed, gold items named, items named, gold items, first right]."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    units = []
    for text, record in zip(predictions, records):
        gold, named = parse_list(record.explanation) or [], parse_list(text)
        mine = (named or [])[:len(gold)]
        units.append([named is not None, len(set(mine) & set(gold)), len(mine), len(gold),
                      bool(mine and gold and mine[0] == gold[0])])
    return units


def list_from_units(units: list) -> dict:
    n = len(units)
    if n == 0:
        return {"n": 0}
    return {"n": n, "parse_rate": sum(u[0] for u in units) / n,
            "recall_at_k": sum(u[1] / u[3] if u[3] else 0.0 for u in units) / n,
            "precision_at_k": sum(u[1] / u[2] if u[2] else 0.0 for u in units) / n,
            "top1": sum(u[4] for u in units) / n}
