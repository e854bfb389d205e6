"""Checks of everything a run reads that can be checked without loading weights: the run folder, each
model spec (a hub id not in the local cache is looked up, within seconds) and each task's data sources.
`selfexplain ... --dry-run` lists every problem and exits 2; a real run stops at them before it starts
Ray or writes anything.
"""
from __future__ import annotations

from selfexplain.groundtruth.errors import BadInput, ConfigError, DataSourceError
from selfexplain.groundtruth.models import ModelSpecError, check_source
from selfexplain.groundtruth.tasks import TASKS

from .config import RunConfig

LOADS_MODELS = ("groundtruth", "train", "eval")


def _check_run_dir(cfg: RunConfig) -> None:
    for folder in (cfg.run_dir, *cfg.run_dir.parents):
        if folder.exists() and not folder.is_dir():
            key = "out_dir" if cfg.out_dir else "name"
            raise ConfigError(f"{key}: the run folder {cfg.run_dir} cannot be made: {folder} is a file")


def _check_model(cfg: RunConfig, name: str) -> None:
    try:
        check_source(cfg.models[name])
    except ModelSpecError as err:
        raise ModelSpecError(f"models.{name}.source: {err}") from None


def _check_task(cfg: RunConfig, task: str) -> None:
    spec, task_cfg = TASKS[task], cfg.tasks[task]
    try:
        (spec.check_inputs or spec.recipe.count_items)(task_cfg, cfg.seed)
    except DataSourceError as err:
        raise DataSourceError(f"tasks.{task}: {err}") from None


def input_problems(cfg: RunConfig, stages: tuple[str, ...]) -> list[BadInput]:
    """Every problem the given stages would meet in their inputs, in config order."""
    checks = [(_check_run_dir, (cfg,))]
    if set(stages) & set(LOADS_MODELS):
        checks += [(_check_model, (cfg, name)) for name in dict.fromkeys(cfg.targets + cfg.explainers)]
    if "groundtruth" in stages:
        checks += [(_check_task, (cfg, task)) for task in cfg.tasks]
    problems = []
    for check, args in checks:
        try:
            check(*args)
        except BadInput as err:
            problems.append(err)
    return problems


def check_inputs(cfg: RunConfig, stages: tuple[str, ...]) -> None:
    """Raise the first problem (the dry run lists them all)."""
    problems = input_problems(cfg, stages)
    if problems:
        raise problems[0]


def problem_lines(problems: list[BadInput]) -> list[str]:
    return [f"  {type(p).__name__}: {p}" for p in problems]


