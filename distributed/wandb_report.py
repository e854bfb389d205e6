"""`selfexplain report CONFIG --wandb`: a W&B report laid out from a finished run.

One section per task: the explainer x target matrix (from matrix.json, per metric), its heatmap and
data-efficiency figure, and the learning curves of the task's explainers, read from their training jobs'
runs (training/live_log.py; the run names and keys are shared). Publishing needs W&B online (a login
and wandb.mode: online); building the report object needs neither, and is what the tests check.
"""
from __future__ import annotations

import os

from selfexplain.eval.matrix import headline
from selfexplain.eval.headline import headline_lines
from selfexplain.eval.report import matrix_table
from selfexplain.groundtruth.errors import BadInput

from .config import RunConfig
from selfexplain.training.live_log import job_run_name

from .tracking import figure_key, train_logs


def build_report(cfg: RunConfig, matrix: dict, entity: str):
    """The report object (nothing is sent anywhere until .save())."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity, project=cfg.wandb.project, name=cfg.name, query=cfg.name)
    logs = train_logs(cfg.layout)
    blocks: list = [wr.TableOfContents(), wr.P(
        f"Run {cfg.name}: targets {', '.join(cfg.targets)}; explainers {', '.join(cfg.explainers)}. "
        "Each table: rows are explainers (trained, untrained, baselines), columns the target they explain; "
        "(self) marks an explainer explaining itself."), wr.MarkdownBlock("\n".join(headline_lines(matrix)))]
    for task, table in matrix["tasks"].items():
        metric = headline(table)
        blocks += [wr.H1(task), wr.P(f"Headline metric: {metric}.")]
        for name in table.get("metrics", [metric]):
            blocks += [wr.H3(name), wr.MarkdownBlock("\n".join(matrix_table(table, name)))]
        figures = [cfg.layout.figure(kind, task) for kind in ("heatmap", "efficiency", "headline")]
        panels: list = [wr.MediaBrowser(title=path.stem, media_keys=[figure_key(path)]) for path in figures if path.exists()]
        if panels:
            blocks.append(wr.PanelGrid(runsets=[runset], panels=panels))
        if ":" not in task and any(job.split("/")[0] == task for job in logs):
            # one line per training job of the task: its run's per-step loss
            jobs = wr.Runset(entity=entity, project=cfg.wandb.project, name=f"{task} training",
                             query=job_run_name(cfg.name, f"{task}/"))
            blocks.append(wr.PanelGrid(runsets=[jobs], panels=[
                wr.LinePlot(title=f"{task}: training loss", x=wr.Metric("Step"), y=[wr.Metric("train/loss")]),
                wr.LinePlot(title=f"{task}: tokens/s", x=wr.Metric("Step"), y=[wr.Metric("train/tokens_per_s")])]))
    return wr.Report(project=cfg.wandb.project, entity=entity, title=f"selfexplain: {cfg.name}",
                     description="Explainer x target matrices, figures and learning curves", blocks=blocks)


def publish_report(cfg: RunConfig, matrix: dict) -> str:
    """Build and save the report; return its URL. Fails with a message when W&B is not online."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if mode != "online":
        raise BadInput(f"W&B is {mode}: a report lives on the W&B server. Sync the offline run "
                         f"(wandb sync {cfg.layout.wandb}/offline-run-*), then rerun with "
                         "WANDB_MODE=online (after `wandb login`)")
    import wandb

    entity = cfg.wandb.entity or wandb.Api().default_entity
    report = build_report(cfg, matrix, entity)
    report.save()
    return report.url
