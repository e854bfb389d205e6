"""How far to trust `selfexplain explain`'s labels: a seeded sample of the explained units goes through
the task's own ground-truth technique (TaskSpec.explain_units.truth), and the explainer's answers are
scored against it with the task's metrics and intervals, beside two controls that say what the score is
worth: another unit's answer (a fixed derangement of the sample: the score of a label that ignores which
unit it names) and, for tasks that read a vector, the explainer asked with v left out. Each difference
is paired over the sample, with its bootstrap 95% interval.

Units whose source the explainer was trained on are never sampled.
"""
from __future__ import annotations

import random
from typing import Optional

from selfexplain.groundtruth.records import Record

from .differences import paired_difference, reading
from .explainer_api import Explainer
from .explain_units import ExplainJob, row_record
from .forms import form_of, make_scorer
from .rows import cyclic_derangement

VALIDATION = "validation.json"
EXEMPLARS_SHOWN = 3
EXPLAINER, OTHER_UNIT, NO_VECTOR = "explainer", "another unit's answer", "explainer, v left out"


def sample_rows(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n rows at random (seeded) among those whose source the explainer never trained on, in row order."""
    eligible = [i for i, row in enumerate(rows) if not row["trained_on"]]
    chosen = sorted(random.Random(f"validate:{seed}").sample(eligible, min(n, len(eligible))))
    return [rows[i] for i in chosen]


def validate(job: ExplainJob, explainer: Explainer, target: tuple, sample: list[dict], eligible: int,
             seed: int) -> dict:
    """The sample's ground truth, the explainer's answers scored against it beside the controls; the
    content of validation.json."""
    ctx, spec_units = job.ctx, job.units
    answer_of = {row["unit"]: row["explanation"] for row in sample}
    labelled: list[Record] = spec_units.truth(ctx, [row_record(r, ctx.task, ctx.target) for r in sample], *target)
    labelled.sort(key=lambda r: r.record_id)
    out = {"task": ctx.task, "target": ctx.target, "explainer": job.explainer, "eligible": eligible,
           "sampled": len(sample), "labelled": len(labelled), "seed": seed, "rows": {}, "differences": [], "units": {}}
    if len(labelled) < 2:
        out["note"] = "fewer than two sampled units have a label from the technique: nothing to score"
        return out
    answers = [answer_of[r.record_id] for r in labelled]
    other = cyclic_derangement(range(len(answers)), f"derange:{seed}")
    rows = {EXPLAINER: answers, OTHER_UNIT: [answers[other[i]] for i in range(len(answers))]}
    if any(r.vector is not None for r in labelled):
        rows[NO_VECTOR] = explainer.explain(labelled, job.max_new_tokens, job.batch_size, with_vector=False)
    score, form = make_scorer(ctx.task, ctx.task_cfg), form_of(ctx.task)
    scored = {name: score(predictions, labelled) for name, predictions in rows.items()}
    out["rows"] = {name: metrics for name, (metrics, _) in scored.items()}
    for control in [name for name in rows if name != EXPLAINER]:
        for metric in form.compared:
            d = paired_difference(scored[EXPLAINER][1], scored[control][1], form.aggregate, metric)
            if d is not None:
                out["differences"].append({"control": control, "metric": metric, **d,
                                           "reading": reading(EXPLAINER, control, metric, d)})
    for record, answer, unit in zip(labelled, answers, scored[EXPLAINER][1]):
        out["units"][record.record_id] = {"gold": record.explanation, "answer": answer,
                                          "scores": dict(zip(form.unit_fields, unit))}
        if "exemplars" in record.query:  # what a person checks a feature label against
            out["units"][record.record_id]["exemplars"] = [
                {"tokens": w["tokens"], "acts": [round(a, 3) for a in w["acts"]]}
                for w in record.query["exemplars"]["top"][:EXEMPLARS_SHOWN]]
    return out


def summary_lines(validation: dict, metrics: Optional[tuple[str, ...]] = None) -> list[str]:
    """What a user reads first: the sample, each row's headline metrics with intervals, each difference."""
    head = (f"validation of {validation['explainer']} on {validation['target']} ({validation['task']}): "
            f"{validation['labelled']} of {validation['sampled']} sampled units labelled by the technique "
            f"(sampled from {validation['eligible']} the explainer never trained on)")
    lines = [head]
    if validation.get("note"):
        return lines + ["  " + validation["note"]]
    metrics = metrics or form_of(validation["task"]).compared
    for name, m in validation["rows"].items():
        parts = [f"{k} {m[k]:.3f} [{m.get(k + '_lo', float('nan')):.3f}, {m.get(k + '_hi', float('nan')):.3f}]"
                 for k in metrics if m.get(k) is not None]
        lines.append(f"  {name}: " + "; ".join(parts))
    lines += [f"  {d['reading']}" for d in validation["differences"]]
    return lines
