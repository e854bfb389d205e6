"""Eval stage: Ray evaluator actors run every explainer on every target's test split; the driver scores.

Rows per task and target: each explainer fine-tuned on that target ("trained"), each explainer before
fine-tuning ("untrained"), for vector tasks the trained explainer with the vector left out of its
prompt ("no_vector", the paper's check of how much v matters), and the configured baselines. Each scored cell is saved under
eval/<task>/<target>/<row>.json with a hash of what it depends on, so a rerun skips finished cells.
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
from eval.metrics import make_scorer
from groundtruth.models import prepare
from groundtruth.records import Record, iter_records
from groundtruth.tasks import TASKS
from training.export import load_explainer
from training.step import TrainJob

from .actor_pool import run_pool
from .config import RunConfig
from .gt_pool import gt_dir
from .ray_session import torch_threads
from .train_job import train_jobs
from .typed_yaml import stable_hash


@dataclass(frozen=True)
class EvalUnit:
    task: str
    target: str
    row: str
    kind: str  # trained | no_vector | untrained
    explainer: str
    job: TrainJob  # the training job of this (task, target, explainer): base model, export, projection
    path: str  # where the scored cell goes
    key: str  # hash of everything the cell depends on


class Evaluator:
    """Loads one explainer per unit and generates explanations for the unit's records."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def explain(self, unit: EvalUnit, records: list[Record], fmt: str, max_new_tokens: int, batch_size: int) -> list[str]:
        from eval.generate import explain
        from groundtruth.models import load_model
        from training.step import job_projection

        job = unit.job
        if unit.kind == "untrained":
            model, tok = load_model(job.explainer_spec)
            projection = None
            if any(r.vector is not None for r in records):  # start from the same Pi training started from
                projection = job_projection(job, records, model.config.hidden_size)
        else:
            model, tok, projection = load_explainer(job.export_dir, {
                "task": unit.task, "target": unit.target, "explainer_spec": dataclasses.asdict(job.explainer_spec)})
        return explain(model, tok, records, fmt, max_new_tokens, batch_size, projection,
                       with_vector=unit.kind != "no_vector")


def test_records(cfg: RunConfig, task: str, target: str) -> list[Record]:
    records = list(iter_records(gt_dir(cfg, task, target) / "test"))
    return records[: cfg.eval.max_examples] if cfg.eval.max_examples else records


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
    exports = {(j.task, j.target, j.explainer): j for j in train_jobs(cfg)}
    scorers = {task: make_scorer(task, task_cfg) for task, task_cfg in cfg.tasks.enabled().items()}
    for task in cfg.tasks.enabled():
        score = scorers[task]
        for target in cfg.targets:
            test = records_of[(task, target)] = test_records(cfg, task, target)
            out = cfg.run_dir / "eval" / task / target
            data_key = stable_hash([r.record_id for r in test] + [eval_settings(cfg), dataclasses.asdict(cfg.tasks.enabled()[task])])
            train: Optional[list[Record]] = None
            for name in (b for b in ec.baselines if BASELINES[b].applies_to(task)):
                path = out / f"{name}.json"
                cell = _load_cell(path, data_key)
                if cell is None:
                    train = train if train is not None else list(iter_records(gt_dir(cfg, task, target) / "train"))
                    preds = BASELINES[name].predict(train, test)
                    cell = Cell(task, name, "baseline", name, target, score(preds, test))
                    _save_cell(path, data_key, cell, preds)
                cells.append(cell)
            for explainer in cfg.explainers:
                job = exports[(task, target, explainer)]
                rows = [("trained", f"{explainer} trained")]
                if TASKS[task].has_vectors and ec.no_vector:
                    rows.append(("no_vector", f"{explainer} trained, no vector"))
                if ec.untrained:
                    rows.append(("untrained", f"{explainer} untrained"))
                for kind, row in rows:
                    stamp = (job.export_dir / "selfexplain.json").read_text() if kind != "untrained" else ""
                    key = stable_hash([data_key, kind, dataclasses.asdict(cfg.models[explainer]), stamp,
                                       cfg.train.prompt_format, dataclasses.asdict(cfg.train.projection)])
                    path = out / f"{row.replace(' ', '_').replace(',', '')}.json"
                    done = _load_cell(path, key)
                    if done:
                        cells.append(done)
                    else:
                        units.append(EvalUnit(task, target, row, kind, explainer, job, str(path), key))
    if units:
        for spec in {u.job.explainer_spec.source: u.job.explainer_spec for u in units}.values():
            prepare(spec)
        actor_cls = ray.remote(num_cpus=ec.actor_cpus, num_gpus=ec.actor_gpus, max_restarts=0)(Evaluator)

        def on_result(unit: EvalUnit, predictions: list[str]) -> int:
            test = records_of[(unit.task, unit.target)]
            cell = Cell(unit.task, unit.row, unit.kind, unit.explainer, unit.target, scorers[unit.task](predictions, test))
            _save_cell(Path(unit.path), unit.key, cell, predictions)
            cells.append(cell)
            return len(predictions)

        run_pool(
            make_actor=lambda: actor_cls.remote(torch_threads(ec.actor_cpus)),
            n_actors=ec.actors, units=units,
            call=lambda actor, u: actor.explain.remote(
                u, records_of[(u.task, u.target)], cfg.train.prompt_format,
                ec.max_new_tokens or TASKS[u.task].explanation_tokens, ec.batch_size),
            on_result=on_result, max_retries=ec.max_retries, desc="eval",
        )
    return cells


def eval_settings(cfg: RunConfig) -> dict:
    """The eval settings a scored cell depends on."""
    ec = cfg.eval
    return {"max_new_tokens": ec.max_new_tokens, "max_examples": ec.max_examples}
