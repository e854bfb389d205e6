"""The explanation forms: form name (TaskSpec.explanation) -> how its explanations are scored, one
`register_form` line per form.

A form is its metrics (eval/metrics.py), which of them carry intervals and enter the headline, and how
a task's predictions become per-record units. The built-in forms are registered below; a task defined
outside the project can bring its own by calling `register_form` in its module, which the run config's
`task_modules` imports here and in every Ray worker. What a form scores with comes from the task's spec
(the description form: its simulator), so no form names a task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from selfexplain.groundtruth.records import Record
from selfexplain.groundtruth.registry import register
from selfexplain.groundtruth.taskspec import TaskSpec
from selfexplain.groundtruth.tasks import task_spec

from .metrics import (ATTRIBUTION_METRICS, CAUSAL_INTERVAL_METRICS, CAUSAL_METRICS, DESCRIPTION_METRICS, LIST_METRICS,
                      attribution_from_units, attribution_units, causal_from_units, causal_units, description_units,
                      list_from_units, list_units, mean_scores, with_intervals)

Units = Callable[[list[str], list[Record]], list]
"""(predictions, records) -> one unit per record (or feature), as JSON."""


@dataclass(frozen=True)
class Form:
    """How one explanation form is scored."""

    name: str
    metrics: tuple[str, ...]
    """What its cells report, headline first."""
    interval_metrics: tuple[str, ...]
    """Those given a bootstrap interval."""
    compared: tuple[str, ...]
    """Those the report's headline differences are taken on (paired bootstrap)."""
    aggregate: Callable[[list], dict]
    """Units -> metrics."""
    units: Callable[[TaskSpec, Any], Units]
    """(task spec, task config) -> the task's units function; judges and simulators built once per task."""
    unit_fields: tuple[str, ...]
    """What each entry of a unit is."""


FORMS: dict[str, Form] = {}
"""Form name -> Form, in registration order."""


def register_form(form: Form) -> Form:
    return register(FORMS, form, "explanation form")


def _description_units(spec: TaskSpec, task_cfg) -> Units:
    from .judges import make_judge

    if spec.simulator is None:
        raise ValueError(f"task {spec.name!r} explains by description but its spec gives no simulator")
    judge, simulator = make_judge(task_cfg.judge, task_cfg.endpoint), spec.simulator(task_cfg)
    return lambda predictions, records: description_units(predictions, records, judge, simulator,
                                                          task_cfg.discriminative_k)


register_form(Form("causal", CAUSAL_METRICS, CAUSAL_INTERVAL_METRICS, ("exact_match", "content_match_changed"),
                   causal_from_units, lambda spec, task_cfg: causal_units,
                   ("gold_changed", "predicted_changed", "exact", "content")))
register_form(Form("description", DESCRIPTION_METRICS, DESCRIPTION_METRICS, ("top1", "simulation", "judge"),
                   mean_scores, _description_units, ("judge", "simulation", "rank", "candidates")))
register_form(Form("attribution", ATTRIBUTION_METRICS, ATTRIBUTION_METRICS, ("exact_match", "recall_at_k"),
                   attribution_from_units, lambda spec, task_cfg: attribution_units, ("parsed", "exact", "in_top_k")))
register_form(Form("list", LIST_METRICS, LIST_METRICS, ("recall_at_k", "top1"), list_from_units,
                   lambda spec, task_cfg: list_units, ("parsed", "hits", "named", "gold", "first_right")))


def form_of(task: str) -> Form:
    """The scoring form of a task ('<task>:<set>' as its task)."""
    name = task_spec(task).explanation
    if name not in FORMS:
        raise KeyError(f"task {task!r} explains in form {name!r}, which no module registered "
                       f"(known: {', '.join(FORMS)}); call eval.forms.register_form in the task's module")
    return FORMS[name]


def metrics_of(task: str) -> tuple[str, ...]:
    """The metrics a task's cells carry, headline first ('<task>:<set>' as its task)."""
    return form_of(task).metrics


def make_scorer(task: str, task_cfg) -> Callable[[list[str], list[Record]], tuple[dict, list]]:
    """score(predictions, records) -> (metrics with intervals and distinct_outputs, per-record units)."""
    form = form_of(task)
    units_of = form.units(task_spec(task), task_cfg)

    def scorer(predictions: list[str], records: list[Record]) -> tuple[dict, list]:
        units = units_of(predictions, records)
        metrics = with_intervals(units, form.aggregate, form.interval_metrics)
        metrics["distinct_outputs"] = len({p.strip() for p in predictions})
        return metrics, units

    return scorer
