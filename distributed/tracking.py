"""Weights & Biases: one run per pipeline run, offline by default (synced later with `wandb sync`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from selfexplain.eval.matrix import cells_of, data_efficiency, headline
from selfexplain.groundtruth.layout import RunLayout

from .config import RunConfig
from .typed_yaml import to_dict


def train_key(job: str, what: str) -> str:
    """History key of a training job's loss or step; job is '<task>/<explainer>_on_<target>'."""
    return f"train/{job}/{what}"


def figure_key(image: Path) -> str:
    """History key of a report figure (heatmap_<task>.png, efficiency_<task>.png)."""
    return f"figures/{image.stem}"


def train_logs(layout: RunLayout) -> dict[str, Path]:
    """Every training job's loss log, by job name."""
    return {f"{log.parent.parent.name}/{log.parent.name}": log for log in layout.train_logs()}


def log_to_wandb(cfg: RunConfig, matrix: dict, images: list[Path]) -> Optional[Path]:
    """Log the matrix as a table, summary scalars per cell, bar charts and heatmaps; return the run folder."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name, dir=str(cfg.run_dir),
                     config=to_dict(cfg), job_type="pipeline", reinit="finish_previous")
    cells = cells_of(matrix)
    metric_names = sorted({k for c in cells for k in c.metrics})
    table = wandb.Table(columns=["task", "row", "kind", "explainer", "target", "self", *metric_names])
    for c in cells:
        table.add_data(c.task, c.row, c.kind, c.explainer, c.target, c.is_self, *[c.metrics.get(m) for m in metric_names])
    run.log({"matrix": table})
    for c in cells:
        for metric, value in c.metrics.items():
            run.summary[f"{c.task}/{metric}/{c.row}/{c.target}"] = value
    for task, task_table in matrix["tasks"].items():
        for target, stats in task_table.get("label_stats", {}).items():  # SAE quality (feature descriptions)
            for layer, sae in stats.get("sae", {}).items():
                for name in ("l0", "explained_variance", "dead_fraction"):
                    run.summary[f"{task}/sae/{target}/layer_{layer}/{name}"] = sae[name]
        metric = headline(task_table)
        rows = [[f"{c.row} -> {c.target}", c.metrics.get(metric, 0.0)] for c in cells if c.task == task]
        bar_table = wandb.Table(data=rows, columns=["cell", metric])
        run.log({f"{task}/{metric}_bar": wandb.plot.bar(bar_table, "cell", metric, title=f"{task}: {metric}")})
        for name, points in data_efficiency(task_table).items():
            curve = wandb.Table(data=[[n, v] for n, v in points], columns=["examples_per_layer", metric])
            run.log({f"{task}/data_efficiency/{name}": wandb.plot.line(
                curve, "examples_per_layer", metric, title=f"{task}: {metric} vs train examples per layer ({name})")})
    for image in images:
        run.log({figure_key(image): wandb.Image(str(image))})
    for name, log in train_logs(cfg.layout).items():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            run.log({train_key(name, "loss"): entry["loss"], train_key(name, "step"): entry["step"]})
    folder = Path(run.dir).parent
    run.finish()
    return folder
