"""Scores of generated explanations, each with a bootstrap 95% interval: causal ones (exact match, has-changed
macro-F1, content match, also within each gold class) and descriptions (judge, simulation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from groundtruth.explanations import parse_explanation
from groundtruth.records import Record
from groundtruth.tasks import task_spec


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


@dataclass(frozen=True)
class Outcome:
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


def _rate(values: list[bool]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def causal_metrics(units: list[Outcome]) -> dict:
    """Exact match, has-changed macro-F1 (an unparseable answer counts as the class opposite to gold),
    content match and parse rate; exact and content match also within each gold class."""
    n = len(units)
    if n == 0:
        return {"n": 0}
    confusion = {(g, p): 0 for g in (True, False) for p in (True, False)}
    for u in units:
        confusion[(u.gold_changed, u.predicted_changed if u.predicted_changed is not None else not u.gold_changed)] += 1
    f1_changed = _f1(confusion[(True, True)], confusion[(False, True)], confusion[(True, False)])
    f1_unchanged = _f1(confusion[(False, False)], confusion[(True, False)], confusion[(False, True)])
    metrics = {"n": n, "exact_match": _rate([u.exact for u in units]), "changed_macro_f1": (f1_changed + f1_unchanged) / 2,
               "content_match": _rate([u.content for u in units]),
               "parse_rate": _rate([u.predicted_changed is not None for u in units])}
    for name, gold in (("changed", True), ("unchanged", False)):
        mine = [u for u in units if u.gold_changed == gold]
        metrics[f"n_{name}"] = len(mine)
        metrics[f"exact_match_{name}"] = _rate([u.exact for u in mine])
        metrics[f"content_match_{name}"] = _rate([u.content for u in mine])
    return metrics


CAUSAL_METRICS = ("exact_match", "changed_macro_f1", "content_match", "content_match_changed", "parse_rate")
"""Headline first; content match on records whose output did change is where reading v shows most."""
DESCRIPTION_METRICS = ("judge", "simulation")
_CAUSAL_INTERVALS = CAUSAL_METRICS + ("exact_match_changed", "exact_match_unchanged", "content_match_unchanged")


def score(predictions: list[str], records: list[Record]) -> dict:
    """Metrics of causal predictions against gold records, each with its bootstrap 95% interval over
    records. Unparseable output counts as wrong everywhere."""
    return with_intervals(outcomes(predictions, records), causal_metrics, _CAUSAL_INTERVALS)


def _mean_scores(units: list[tuple[float, float]]) -> dict:
    if not units:
        return {"n": 0}
    return {"n": len(units), "judge": sum(u[0] for u in units) / len(units),
            "simulation": sum(u[1] for u in units) / len(units)}


def score_descriptions(predictions: list[str], records: list[Record], judge, simulator) -> dict:
    """Task A: the judge's 0..1 similarity to the gold description and the simulation score of the
    generated description on the feature's exemplars (carried in each record's query), averaged over
    features, each with its bootstrap 95% interval over features."""
    from groundtruth.features.exemplars import FeatureExemplars
    from groundtruth.features.simulators import simulation_score

    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    if not records:
        return {"n": 0}
    grades = judge.grade([p.strip() for p in predictions], [r.explanation for r in records])
    sims = [simulation_score(simulator, p.strip(), FeatureExemplars.from_json(r.query["exemplars"]))
            for p, r in zip(predictions, records)]
    return with_intervals(list(zip(grades, sims)), _mean_scores, DESCRIPTION_METRICS)


def _description_scorer(task_cfg):
    from groundtruth.features.task import simulator_of

    from .judges import make_judge

    judge, simulator = make_judge(task_cfg.judge, task_cfg.endpoint), simulator_of(task_cfg)
    return lambda predictions, records: score_descriptions(predictions, records, judge, simulator)


FORMS = {
    # explanation form -> (metrics, headline first; scorer factory(task config) -> score(predictions, records))
    "causal": (CAUSAL_METRICS, lambda task_cfg: score),
    "description": (DESCRIPTION_METRICS, _description_scorer),  # judge and simulator built once per task
}
"""What each explanation form (TaskSpec.explanation) is scored by."""


def metrics_of(task: str) -> tuple[str, ...]:
    """The metrics a task's cells carry, headline first ('<task>:<set>' as its task)."""
    return FORMS[task_spec(task).explanation][0]


def make_scorer(task: str, task_cfg):
    """score(predictions, records) -> metrics for a task, by the form of its explanations."""
    return FORMS[task_spec(task).explanation][1](task_cfg)
