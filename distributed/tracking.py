"""Weights & Biases, offline by default (`wandb sync` uploads): a pipeline run per command, grouped with
one run per training job (training/live_log.py: loss, learning rate, tokens/s and memory at every step).
The pipeline run gets ground truth's and eval's progress as it happens (units, records, rate), then the
matrix, summary scalars, charts and figures, and a table linking the training jobs' runs."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from selfexplain.eval.matrix import cells_of, data_efficiency, headline
from selfexplain.groundtruth.layout import RunLayout
from selfexplain.training.job import WandbRun
from selfexplain.training.live_log import job_name, job_run_name

from .config import RunConfig
from .typed_yaml import to_dict

_PIPELINE_RUN = None
"""The pipeline's W&B run while a command's stages run (pipeline_run), for progress and results."""


def job_wandb(cfg: RunConfig) -> Optional[WandbRun]:
    """Where the run's training jobs log their curves: the pipeline's project, in its group (none when
    W&B is off)."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if not cfg.wandb.enabled or mode == "disabled":
        return None
    return WandbRun(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=mode, group=cfg.name,
                    dir=str(cfg.run_dir))


@contextmanager
def pipeline_run(cfg: RunConfig) -> Iterator[None]:
    """The pipeline's W&B run, open while a command's stages run."""
    global _PIPELINE_RUN
    where = job_wandb(cfg)
    if where is None or _PIPELINE_RUN is not None:
        yield
        return
    import wandb

    Path(where.dir).mkdir(parents=True, exist_ok=True)
    _PIPELINE_RUN = wandb.init(project=where.project, entity=where.entity, mode=where.mode, group=where.group,
                               name=cfg.name, dir=where.dir, config=to_dict(cfg), job_type="pipeline",
                               reinit="create_new", settings=wandb.Settings(silent=True))
    try:
        yield
    finally:
        _PIPELINE_RUN.finish()
        _PIPELINE_RUN = None


def log_progress(stage: str, values: dict) -> None:
    """A stage's progress into the open pipeline run (nothing when none is open), e.g. stage
    'groundtruth input_ablation/smollm2', values {'units_done': 3, 'records': 27, 'records_per_s': 4.1}."""
    if _PIPELINE_RUN is not None:
        prefix = "progress/" + stage.replace(" ", "/")
        _PIPELINE_RUN.log({f"{prefix}/{k}": v for k, v in values.items()})


def figure_key(image: Path) -> str:
    """History key of a report figure (heatmap_<task>.png, efficiency_<task>.png)."""
    return f"figures/{image.stem}"


def train_logs(layout: RunLayout) -> dict[str, Path]:
    """Every training job's loss log, by job name."""
    return {job_name(log.parent): log for log in layout.train_logs()}


def log_to_wandb(cfg: RunConfig, matrix: dict, images: list[Path]) -> Optional[Path]:
    """Log the matrix as a table, summary scalars per cell, bar charts, heatmaps and the training jobs'
    runs into the pipeline run; return its folder."""
    with pipeline_run(cfg):
        run = _PIPELINE_RUN
        if run is None:
            return None
        _log_results(run, cfg, matrix, images)
        return Path(run.dir).parent


def _log_results(run, cfg: RunConfig, matrix: dict, images: list[Path]) -> None:
    import wandb

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
    jobs = wandb.Table(columns=["job", "W&B run", "group"],
                       data=[[name, job_run_name(cfg.name, name), cfg.name] for name in train_logs(cfg.layout)])
    run.log({"training_jobs": jobs})
