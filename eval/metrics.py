"""Scores of generated causal explanations (tasks B and C): exact match, has-changed macro-F1, content match."""
from __future__ import annotations

from groundtruth.explanations import parse_explanation
from groundtruth.records import Record
from groundtruth.tasks import task_spec


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def score(predictions: list[str], records: list[Record]) -> dict:
    """Metrics of predictions against gold records. Unparseable output counts as wrong everywhere
    (for the F1 it is taken as the class opposite to gold)."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    n = len(records)
    if n == 0:
        return {"n": 0}
    exact = content = parsed = 0
    confusion = {(g, p): 0 for g in (True, False) for p in (True, False)}
    for text, rec in zip(predictions, records):
        gold = parse_explanation(rec.explanation)
        pred = parse_explanation(text)
        if pred is None:
            confusion[(rec.changed, not rec.changed)] += 1
            continue
        parsed += 1
        confusion[(rec.changed, pred[0])] += 1
        content += pred[1] == gold[1]
        exact += pred == gold
    f1_changed = _f1(confusion[(True, True)], confusion[(False, True)], confusion[(True, False)])
    f1_unchanged = _f1(confusion[(False, False)], confusion[(True, False)], confusion[(False, True)])
    return {
        "n": n,
        "exact_match": exact / n,
        "changed_macro_f1": (f1_changed + f1_unchanged) / 2,
        "content_match": content / n,
        "parse_rate": parsed / n,
    }


CAUSAL_METRICS = ("exact_match", "changed_macro_f1", "content_match", "parse_rate")
DESCRIPTION_METRICS = ("judge", "simulation")


def score_descriptions(predictions: list[str], records: list[Record], judge, simulator) -> dict:
    """Task A: the judge's 0..1 similarity to the gold description and the simulation score of the
    generated description on the feature's exemplars (carried in each record's query), averaged."""
    from groundtruth.features.exemplars import FeatureExemplars
    from groundtruth.features.simulators import simulation_score

    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    if not records:
        return {"n": 0}
    grades = judge.grade([p.strip() for p in predictions], [r.explanation for r in records])
    sims = [simulation_score(simulator, p.strip(), FeatureExemplars.from_json(r.query["exemplars"]))
            for p, r in zip(predictions, records)]
    return {"n": len(records), "judge": sum(grades) / len(grades), "simulation": sum(sims) / len(sims)}


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
