"""Eval stage: Ray evaluator actors run every explainer on every target's test split; the driver scores.

Rows per task and target: each explainer fine-tuned on that target ("trained"), each explainer before
fine-tuning ("untrained"), for vector tasks the trained explainer with the vector left out of its
prompt ("no_vector", the paper's check of how much v matters), for feature descriptions SelfIE (the
untrained explainer reading v unit-normalised and scaled, best of eval.selfie_scales), and the
configured baselines. Tasks with out-of-distribution sets (feature descriptions: ACT, dACT) score
the trained rows and baselines on those too, as matrix tasks '<task>:<set>'. Each scored cell is saved
under eval/<task>/<target>/<row>.json with a hash of what it depends on, so a rerun skips finished cells.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from eval.baselines import BASELINES
from eval.matrix import Cell
from eval.metrics import make_scorer, metrics_of
from groundtruth.models import prepare
from groundtruth.records import Record, iter_records
from groundtruth.tasks import TASKS
from training.export import METADATA, load_explainer
from training.job import TrainJob

from .actor_pool import run_pool
from .config import RunConfig
from .ray_session import torch_threads
from .train_job import train_jobs
from .typed_yaml import stable_hash


@dataclass(frozen=True)
class EvalUnit:
    task: str
    cell_task: str  # the matrix task: task, or '<task>:<set>' for an out-of-distribution set
    target: str
    row: str
    kind: str  # trained | no_vector | untrained | selfie | subset (trained on n records per layer)
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

    def explain(self, group: list[EvalUnit], records: list[list[Record]], fmt: str, max_new_tokens: list[int],
                batch_size: int, scales: tuple[float, ...] = ()) -> list:
        """Per unit, its predictions; for SelfIE a dict scale -> predictions."""
        from eval.generate import explain
        from groundtruth.models import load_model, model_device
        from training.vectors import job_projection

        job, first = group[0].job, group[0]
        if first.kind in BASE_KINDS:
            model, tok = load_model(job.explainer_spec)
            trained_projection = None
        else:
            model, tok, trained_projection = load_explainer(job.export_dir, {
                "task": first.task, "target": first.target, "explainer_spec": dataclasses.asdict(job.explainer_spec)})
        out = []
        for unit, recs, tokens in zip(group, records, max_new_tokens):
            projection = trained_projection
            if unit.kind in BASE_KINDS and any(r.vector is not None for r in recs):
                # the Pi training started from, beside the model
                projection = job_projection(job, recs, model.config.hidden_size).to(model_device(model))
            if unit.kind == "selfie":
                out.append({scale: explain(model, tok, recs, fmt, tokens, batch_size, projection, vector_scale=scale)
                            for scale in scales})
            else:
                out.append(explain(model, tok, recs, fmt, tokens, batch_size, projection, with_vector=unit.kind != "no_vector"))
        return out


BASE_KINDS = ("untrained", "selfie")  # rows that read the explainer's base weights, not its export


def group_units(units: list[EvalUnit]) -> list[list[EvalUnit]]:
    """Units sharing the weights they read (same job, export or base), in first-seen order."""
    groups: dict[tuple, list[EvalUnit]] = {}
    for u in units:
        groups.setdefault((u.job.out_dir, u.kind in BASE_KINDS), []).append(u)
    return list(groups.values())


def test_records(cfg: RunConfig, task: str, target: str, split: str = "test") -> list[Record]:
    """The records a split is scored on (at most eval.max_examples); [] for a set a run did not make."""
    folder = cfg.layout.split(task, target, split)
    if split != "test" and not (folder / "manifest.json").exists():
        return []
    records = list(iter_records(folder))
    return records[: cfg.eval.max_examples] if cfg.eval.max_examples else records


def best_scale(scored: dict[float, dict], metric: str) -> tuple[float, dict]:
    """SelfIE: the scale whose metrics are best on `metric` (the paper reports the best scale)."""
    scale = max(scored, key=lambda s: (scored[s].get(metric, 0.0), -s))
    return scale, {**scored[scale], "scale": scale, f"{metric}_by_scale": {str(s): m.get(metric) for s, m in scored.items()}}


def _save_cell(path: Path, key: str, cell: Cell, predictions: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "cell": dataclasses.asdict(cell), "predictions": predictions}, indent=1))
    os.replace(tmp, path)


def _load_cell(path: Path, key: str) -> Optional[Cell]:
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return Cell(**saved["cell"]) if saved.get("key") == key else None


def run_eval_stage(cfg: RunConfig) -> list[Cell]:
    """Score every row on every target; returns all cells (loaded from disk where already done)."""
    import ray

    ec = cfg.eval
    cells: list[Cell] = []
    units: list[EvalUnit] = []
    records_of: dict[tuple[str, str], list[Record]] = {}
    jobs = train_jobs(cfg)
    exports = {(j.task, j.target, j.explainer): j for j in jobs if j.max_records_per_layer is None}
    subsets = [j for j in jobs if j.max_records_per_layer is not None]  # the data-efficiency curve
    scorers = {task: make_scorer(task, task_cfg) for task, task_cfg in cfg.tasks.items()}
    for task in cfg.tasks:
        score, spec = scorers[task], TASKS[task]
        for split in spec.eval_splits:
            cell_task = task if split == "test" else f"{task}:{split}"
            for target in cfg.targets:
                test = records_of[(cell_task, target)] = test_records(cfg, task, target, split)
                if not test:
                    continue
                data_key = stable_hash([r.record_id for r in test] + [eval_settings(cfg), dataclasses.asdict(cfg.tasks[task])])
                train: Optional[list[Record]] = None
                for name in (b for b in ec.baselines if BASELINES[b].applies_to(task)):
                    path = cfg.layout.eval_cell(cell_task, target, name)
                    cell = _load_cell(path, data_key)
                    if cell is None:
                        train = train if train is not None else list(iter_records(cfg.layout.split(task, target, "train")))
                        preds = BASELINES[name].predict(train, test)
                        cell = Cell(cell_task, name, "baseline", name, target, score(preds, test))
                        _save_cell(path, data_key, cell, preds)
                    cells.append(cell)
                for explainer in cfg.explainers:
                    main = exports[(task, target, explainer)]
                    rows = [("trained", f"{explainer} trained", main)]
                    if split == "test":
                        if spec.has_vectors and ec.no_vector:
                            rows.append(("no_vector", f"{explainer} trained, no vector", main))
                        if ec.untrained:
                            rows.append(("untrained", f"{explainer} untrained", main))
                        if spec.selfie and ec.selfie_scales:
                            rows.append(("selfie", f"{explainer} SelfIE", main))
                        rows += [("subset", f"{explainer} trained, {j.max_records_per_layer} per layer", j) for j in subsets
                                 if (j.task, j.target, j.explainer) == (task, target, explainer)]
                    for kind, row, job in rows:
                        stamp = (job.export_dir / METADATA).read_text() if kind in ("trained", "no_vector", "subset") else ""
                        key = stable_hash([data_key, kind, dataclasses.asdict(cfg.models[explainer]), stamp,
                                           cfg.train.prompt_format, dataclasses.asdict(cfg.train.projection),
                                           ec.selfie_scales if kind == "selfie" else None])
                        path = cfg.layout.eval_cell(cell_task, target, row)
                        done = _load_cell(path, key)
                        if done:
                            cells.append(done)
                        else:
                            units.append(EvalUnit(task, cell_task, target, row, kind, explainer, job, str(path), key))
    if units:
        for spec in {u.job.explainer_spec.source: u.job.explainer_spec for u in units}.values():
            prepare(spec)
        actor_cls = ray.remote(num_cpus=ec.actor_cpus, num_gpus=ec.actor_gpus, max_restarts=0)(Evaluator)

        def on_result(group: list[EvalUnit], results: list) -> int:
            return sum(score_unit(unit, predictions) for unit, predictions in zip(group, results))

        def score_unit(unit: EvalUnit, predictions) -> int:
            test = records_of[(unit.cell_task, unit.target)]
            score = scorers[unit.task]
            if unit.kind == "selfie":
                scale, metrics = best_scale({s: score(p, test) for s, p in predictions.items()}, metrics_of(unit.task)[0])
                predictions = predictions[scale]
            else:
                metrics = score(predictions, test)
            if unit.kind in ("trained", "subset") and getattr(cfg.tasks[unit.task], "data_efficiency", None):
                metrics["examples_per_layer"] = unit.job.records_per_layer()
            cell = Cell(unit.cell_task, unit.row, unit.kind, unit.explainer, unit.target, metrics)
            _save_cell(Path(unit.path), unit.key, cell, predictions)
            cells.append(cell)
            return len(predictions)

        run_pool(
            make_actor=lambda: actor_cls.remote(torch_threads(ec.actor_cpus)),
            n_actors=ec.actors, units=group_units(units),
            call=lambda actor, group: actor.explain.remote(
                group, [records_of[(u.cell_task, u.target)] for u in group], cfg.train.prompt_format,
                [ec.max_new_tokens or TASKS[u.task].explanation_tokens for u in group], ec.batch_size,
                tuple(ec.selfie_scales)),
            on_result=on_result, max_retries=ec.max_retries, desc="eval", unit_name="group",
        )
    return cells


def eval_settings(cfg: RunConfig) -> dict:
    """The eval settings a scored cell depends on."""
    ec = cfg.eval
    return {"max_new_tokens": ec.max_new_tokens, "max_examples": ec.max_examples}
