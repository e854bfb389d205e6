"""Eval stage: Ray evaluator actors run every explainer on every target's test split; the driver scores.

Rows per task and target: each explainer's row kinds (eval/rows.py: trained, trained without v,
untrained, SelfIE, trained on n records per layer, as each applies) and the configured baselines. Tasks with out-of-distribution sets (feature descriptions: ACT, dACT) score
the trained rows and baselines on those too, as matrix tasks '<task>:<set>'. Each scored cell is saved
under eval/<task>/<target>/<row>.json with a hash of what it depends on, so a rerun skips finished cells.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from selfexplain.eval.baselines import BASELINES
from selfexplain.eval.matrix import Cell, load_cell, save_cell
from selfexplain.eval.forms import make_scorer, metrics_of
from selfexplain.eval.rows import ROW_KINDS, plan_rows, row_records
from selfexplain.groundtruth.dataset import stratified_sample
from selfexplain.groundtruth.models import prepare
from selfexplain.groundtruth.records import Record, ShardError, iter_records, read_manifest
from selfexplain.groundtruth.tasks import TASKS
from selfexplain.training.export import METADATA, load_explainer, reads_vectors
from selfexplain.training.job import TrainJob

from .actor_pool import run_pool
from .config import RunConfig
from .gt_pool import gt_hash
from .ray_session import torch_threads
from .train_job import train_jobs
from .typed_yaml import stable_hash


@dataclass(frozen=True)
class EvalUnit:
    task: str
    cell_task: str  # the matrix task: task, or '<task>:<set>' for an out-of-distribution set
    target: str
    row: str
    kind: str  # a key of eval.rows.ROW_KINDS
    explainer: str
    job: TrainJob  # the training job of this (task, target, explainer): base model, export, projection
    path: str  # where the scored cell goes
    key: str  # hash of everything the cell depends on


class Evaluator:
    """Generates explanations for groups of units that read the same weights: the model is loaded once
    per group (a trained export serves its trained, no-vector and out-of-distribution rows; the base
    model its untrained and SelfIE rows)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def explain(self, group: list[EvalUnit], records: list[list[Record]], fmt: str, max_new_tokens: int,
                batch_size: int, scales: tuple[float, ...] = ()) -> list:
        """Per unit, its predictions; for SelfIE a dict scale -> predictions. The units' questions go
        through the model together (eval.generate.explain_all), so batches fill up across rows; they
        share one job, hence one task and one answer length."""
        from selfexplain.eval.generate import Ask, explain_all
        from selfexplain.groundtruth.models import load_model, model_device
        from selfexplain.training.vectors import job_projection, match_injection_norm

        job, first = group[0].job, group[0]
        if ROW_KINDS[first.kind].reads_base:
            model, tok = load_model(job.explainer_spec)
            trained_projection = None
        else:
            model, tok, trained_projection = load_explainer(job.export_dir, {
                "task": first.task, "target": first.target, "explainer_spec": dataclasses.asdict(job.explainer_spec)})
        asks: list[tuple[int, Optional[float], Ask]] = []  # (unit index, SelfIE scale, its questions)
        for index, (unit, recs) in enumerate(zip(group, records)):
            kind = ROW_KINDS[unit.kind]
            recs = row_records(kind, job, recs)
            projection = trained_projection
            if kind.reads_base and any(r.vector is not None for r in recs):
                # the Pi training started from, beside the model
                projection = job_projection(job, recs, model.config.hidden_size).to(model_device(model))
                projection = match_injection_norm(projection, job, model)
            for scale in (scales if kind.scaled else (None,)):
                asks.append((index, scale, Ask(recs, projection, kind.with_vector, scale)))
        out: list = [{} if ROW_KINDS[u.kind].scaled else None for u in group]
        for (i, scale, _), answers in zip(asks, explain_all(model, tok, [a for *_, a in asks], fmt, max_new_tokens,
                                                            batch_size)):
            if scale is None:
                out[i] = answers
            else:
                out[i][scale] = answers
        return out


def group_units(units: list[EvalUnit]) -> list[list[EvalUnit]]:
    """Units sharing the weights they read (same job, export or base), in first-seen order."""
    groups: dict[tuple, list[EvalUnit]] = {}
    for u in units:
        groups.setdefault((u.job.out_dir, ROW_KINDS[u.kind].reads_base), []).append(u)
    return list(groups.values())


def test_records(cfg: RunConfig, task: str, target: str, split: str = "test") -> list[Record]:
    """The records a split is scored on (at most eval.max_examples, a seeded stratified sample); [] for a
    set a run did not make."""
    folder = cfg.layout.split(task, target, split)
    if split != "test" and not (folder / "manifest.json").exists():
        return []
    made, now = read_manifest(folder).get("config_hash"), gt_hash(cfg, task, target)
    if made is not None and made != now:
        raise ShardError(f"{folder} was made for another target model or {task} settings than the config gives "
                         f"(hash {made}, now {now}); rerun the groundtruth stage or fix the config")
    records = list(iter_records(folder))
    if not cfg.eval.max_examples or cfg.eval.max_examples >= len(records):
        return records
    # a seeded sample spread over the task's balancing cells (patching: token type x block) or layers
    cell_of = TASKS[task].balance_cell or (lambda r: str(r.layers))
    chosen = stratified_sample(records, cfg.eval.max_examples, cell_of, random.Random(cfg.seed))
    return sorted(chosen, key=lambda r: r.record_id)


def best_scale(scored: dict[float, dict], metric: str) -> tuple[float, dict]:
    """SelfIE: the scale whose metrics are best on `metric` (the paper reports the best scale)."""
    scale = max(scored, key=lambda s: (scored[s].get(metric, 0.0), -s))
    return scale, {**scored[scale], "scale": scale, f"{metric}_by_scale": {str(s): m.get(metric) for s, m in scored.items()}}


@dataclass
class EvalPlan:
    """What the eval stage has to do: cells already scored, units to generate, the records of each set."""

    cells: list[Cell] = field(default_factory=list)
    units: list[EvalUnit] = field(default_factory=list)
    records_of: dict[tuple[str, str], list[Record]] = field(default_factory=dict)  # (cell task, target) -> records


def _baseline_cells(cfg: RunConfig, task: str, cell_task: str, target: str, test: list[Record], data_key: str,
                    score) -> list[Cell]:
    """The configured baselines that apply to the task, scored (or read back when already scored)."""
    cells, train = [], None
    for name in (b for b in cfg.eval.baselines if BASELINES[b].applies_to(task)):
        path = cfg.layout.eval_cell(cell_task, target, name)
        cell = load_cell(path, data_key)
        if cell is None:
            train = train if train is not None else list(iter_records(cfg.layout.split(task, target, "train")))
            preds = BASELINES[name].predict(train, test)
            cell = Cell(cell_task, name, "baseline", name, target, *score(preds, test))
            save_cell(path, data_key, cell, preds)
        cells.append(cell)
    return cells


def _explainer_rows(cfg: RunConfig, plan: EvalPlan, task: str, split: str, target: str, data_key: str,
                    jobs: list[TrainJob]) -> None:
    """Each explainer's rows of one (task, split, target) (eval/rows.py): read back, or planned as units."""
    cell_task = task if split == "test" else f"{task}:{split}"
    for explainer in cfg.explainers:
        mine = [j for j in jobs if (j.task, j.target, j.explainer) == (task, target, explainer)]
        main = next(j for j in mine if j.max_records_per_layer is None and j.control is None)
        subsets = [j for j in mine if j.max_records_per_layer is not None]  # the data-efficiency curve
        controls = [j for j in mine if j.control is not None]
        for row in plan_rows(TASKS[task], split, cfg.eval, explainer, main, subsets, controls):
            kind = row.kind
            stamp = "" if kind.reads_base else (row.job.export_dir / METADATA).read_text()
            key = stable_hash([data_key, kind.name, dataclasses.asdict(cfg.models[explainer]), stamp,
                               cfg.train.prompt_format,
                               dataclasses.asdict(cfg.train.projection) if reads_vectors(task) else None,
                               cfg.eval.selfie_scales if kind.scaled else None])
            path = cfg.layout.eval_cell(cell_task, target, row.label)
            done = load_cell(path, key)
            if done:
                plan.cells.append(done)
            else:
                plan.units.append(EvalUnit(task, cell_task, target, row.label, kind.name, explainer, row.job, str(path), key))


def plan_eval(cfg: RunConfig, scorers: dict) -> EvalPlan:
    """Every cell of every task's matrix: baselines scored here, explainer rows read back or to generate."""
    plan, jobs = EvalPlan(), train_jobs(cfg)
    for task in cfg.tasks:
        for split in TASKS[task].eval_splits:
            cell_task = task if split == "test" else f"{task}:{split}"
            for target in cfg.targets:
                test = plan.records_of[(cell_task, target)] = test_records(cfg, task, target, split)
                if not test:
                    continue
                data_key = stable_hash([r.record_id for r in test] + [eval_settings(cfg, task), dataclasses.asdict(cfg.tasks[task])])
                plan.cells += _baseline_cells(cfg, task, cell_task, target, test, data_key, scorers[task])
                _explainer_rows(cfg, plan, task, split, target, data_key, jobs)
    return plan


def _scored_cell(cfg: RunConfig, unit: EvalUnit, predictions, test: list[Record], score) -> tuple[Cell, list[str]]:
    """A unit's cell from its predictions (SelfIE: the best scale's) and the predictions kept with it."""
    kind = ROW_KINDS[unit.kind]
    if kind.scaled:
        scored = {s: score(p, test) for s, p in predictions.items()}
        scale, metrics = best_scale({s: m for s, (m, _) in scored.items()}, metrics_of(unit.task)[0])
        predictions, units = predictions[scale], scored[scale][1]
    else:
        metrics, units = score(predictions, test)
    if kind.curve and cfg.eval.data_efficiency.get(unit.task):
        metrics["examples_per_layer"] = unit.job.records_per_layer()
    size = None if kind.reads_base else unit.job.max_records_per_layer
    return Cell(unit.cell_task, unit.row, unit.kind, unit.explainer, unit.target, metrics, units, size), predictions


def check_answer_budgets(cfg: RunConfig, plan: EvalPlan) -> list[str]:
    """Where a decode budget is shorter than a gold explanation of the records it scores, in the tokens of
    the explainer that has to write it, a warning each: an answer cut before its closing marker does not
    parse, and the row reads as an explainer that failed. Each trained explainer's export tokenizer counts
    the few longest gold texts (by characters) of each scored set. (A warning, not an error: tiny test
    models decode a few tokens on purpose.)"""
    from transformers import AutoTokenizer

    warnings, seen, tokenizers = [], set(), {}
    for unit in plan.units:
        if ROW_KINDS[unit.kind].reads_base or (unit.cell_task, unit.target, unit.explainer) in seen:
            continue
        seen.add((unit.cell_task, unit.target, unit.explainer))
        golds = sorted({r.explanation for r in plan.records_of[(unit.cell_task, unit.target)]}, key=len)[-8:]
        # one per explainer: its exports differ only by the [vec] tokens, which no gold text holds
        tok = tokenizers.get(unit.explainer) or tokenizers.setdefault(
            unit.explainer, AutoTokenizer.from_pretrained(unit.job.export_dir))
        longest = max((len(tok(g, add_special_tokens=False).input_ids) for g in golds), default=0)
        budget = cfg.eval.budget_for(unit.task)
        if longest > budget:
            warnings.append(f"{budget} new tokens cut {unit.cell_task}'s gold explanations on target {unit.target}: "
                            f"the longest takes {longest} of {unit.explainer}'s tokens, so its answers cannot close; "
                            f"set eval.max_new_tokens_by_task.{unit.task} (or eval.max_new_tokens) to at least {longest}")
    return warnings


def run_eval_stage(cfg: RunConfig) -> list[Cell]:
    """Score every row on every target; returns all cells (loaded from disk where already done)."""
    import ray

    ec = cfg.eval
    scorers = {task: make_scorer(task, task_cfg) for task, task_cfg in cfg.tasks.items()}
    plan = plan_eval(cfg, scorers)
    if not plan.units:
        return plan.cells
    for warning in check_answer_budgets(cfg, plan):
        print(f"[eval] warning: {warning}", flush=True)
    for spec in {u.job.explainer_spec.source: u.job.explainer_spec for u in plan.units}.values():
        prepare(spec)
    actor_cls = ray.remote(num_cpus=ec.actor_cpus, num_gpus=ec.actor_gpus, max_restarts=0)(Evaluator)

    def on_result(group: list[EvalUnit], results: list) -> int:
        explained = 0
        for unit, predictions in zip(group, results):
            cell, kept = _scored_cell(cfg, unit, predictions, plan.records_of[(unit.cell_task, unit.target)],
                                      scorers[unit.task])
            save_cell(Path(unit.path), unit.key, cell, kept)
            plan.cells.append(cell)
            explained += len(kept)
        return explained

    def answers(group: list[EvalUnit]) -> int:
        return sum(len(plan.records_of[(u.cell_task, u.target)]) * (len(ec.selfie_scales) if ROW_KINDS[u.kind].scaled
                                                                    else 1) for u in group)

    run_pool(
        make_actor=lambda: actor_cls.remote(torch_threads(ec.actor_cpus)),
        # the longest groups first: the last to finish are short, so no actor waits long on another
        n_actors=ec.actors, units=sorted(group_units(plan.units), key=answers, reverse=True),
        call=lambda actor, group: actor.explain.remote(
            group, [plan.records_of[(u.cell_task, u.target)] for u in group], cfg.train.prompt_format,
            ec.budget_for(group[0].task), ec.batch_size,
            tuple(ec.selfie_scales)),
        on_result=on_result, max_retries=ec.max_retries, desc="eval", unit_name="group",
    )
    return plan.cells


def eval_settings(cfg: RunConfig, task: str) -> dict:
    """The eval settings a scored cell of the task depends on."""
    return {"max_new_tokens": cfg.eval.budget_for(task), "max_examples": cfg.eval.max_examples}
