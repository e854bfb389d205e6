"""The run config: one typed tree of the components' own config dataclasses, loaded from YAML.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=1e-4"])

Unknown keys and wrong types fail with the dotted path of the key; the resolved config is saved into
every run folder (config.resolved.yaml) together with the code version.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from selfexplain.eval.settings import RowSettings
from selfexplain.groundtruth.layout import RunLayout
from selfexplain.groundtruth.models import ModelSpec, ModelSpecError, describe
from selfexplain.groundtruth.records import write_atomic
from selfexplain.groundtruth.tasks import TASKS, import_task_modules
from selfexplain.training.job import TrainConfig, precision_conflict

from .scaling import ScalePlanConfig
from .typed_yaml import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


def task_configs(raw: dict) -> dict:
    """The enabled tasks' configs, each built by its registered config class (null: off), in the order
    given. Already-built configs pass through (check() may run again)."""
    out = {}
    for name, value in raw.items():
        if name not in TASKS:
            raise ConfigError(f"tasks.{name}: unknown task (known: {', '.join(sorted(TASKS))})")
        if value is not None:
            out[name] = value if isinstance(value, TASKS[name].config) else from_dict(TASKS[name].config, value, f"tasks.{name}")
    return out


@dataclass
class RayConfig:
    """Where Ray runs."""

    address: Optional[str] = None
    """Address of a running cluster ('auto', 'ray://host:10001', ...); null starts Ray in this process."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a local Ray (null: the machine's cores)."""
    include_dashboard: Optional[bool] = None
    """Dashboard of a local Ray: null lets Ray start it (it does with ray[default]); Ray Train's
    state queries and the progress metrics need it. Clusters have their own."""
    temp_dir: Optional[str] = None
    """Ray's session folder for a local Ray (null: Ray's default)."""


@dataclass
class ActorPoolConfig:
    """A pool of Ray actors, each holding one model copy (ground truth and eval both use one)."""

    actors: int = 1
    """Actors, each holding one model copy."""
    actor_cpus: float = 1.0
    """CPUs per actor; also its torch thread count (at least 1), so actors do not oversubscribe cores."""
    actor_gpus: float = 0.0
    """GPUs per actor (1 on GPU clusters)."""
    batch_size: int = 16
    """Inputs a technique or explainer runs together: for generation, prompts generated together (one KV
    cache), their prompts run in length-sorted chunks of at most 16 (groundtruth/generation.py)."""
    max_retries: int = 3
    """Attempts per unit of work after actor deaths before the stage fails."""


@dataclass
class GroundTruthConfig(ActorPoolConfig):
    """The actor pool that runs a technique on the target and writes shards."""

    items_per_shard: int = 64
    """Work items per raw shard: the unit that is retried when an actor dies."""
    shard_size: int = 2000
    """Records per finished train/test shard."""


@dataclass
class EvalConfig(ActorPoolConfig, RowSettings):
    """Evaluator actors that run explainers on held-out records, and what they score (eval/settings.py)."""

    batch_size: int = 64
    """Explanations generated together. Decoding reads every weight once per step for all rows, so more
    rows cost less per row (SmolLM2 on 2 cores: 5.2 ms a row at 64 vs 8.2 ms at 16); the prompts still
    run in length-sorted chunks of 16."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking (offline unless you log in and set mode: online)."""

    enabled: bool = True
    project: str = "selfexplain"
    entity: Optional[str] = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    """WANDB_MODE in the environment overrides this."""


@dataclass
class RunConfig:
    """A whole run: models, tasks, and each stage's settings."""

    name: str
    """Run name; the run folder is runs/<name> unless out_dir is set."""
    models: dict[str, ModelSpec]
    """Named model specs, referred to by targets and explainers."""
    targets: list[str]
    """Models whose behaviour is explained (frozen)."""
    explainers: list[str]
    """Models fine-tuned to explain each target (self when explainer == target)."""
    tasks: dict[str, Any]
    """Task name -> its config (see each task's module; groundtruth/tasks.py lists them); a task that is
    absent or null does not run. Tasks run in the order listed."""
    task_modules: list[str] = field(default_factory=list)
    """Modules of your own that register tasks (groundtruth/tasks.py register_task), imported before the
    tasks are read, here and in every worker, e.g. [mylab.attribution_patching]."""
    out_dir: Optional[str] = None
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    groundtruth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    scale: ScalePlanConfig = field(default_factory=ScalePlanConfig)
    """Hardware and utilisation the dry run's GPU-hour estimates assume (GPU recipes only)."""

    def check(self) -> None:
        for key in ("targets", "explainers"):
            names = getattr(self, key)
            if not names:
                raise ValueError(f"{key}: name at least one model")
            for i, name in enumerate(names):
                if name not in self.models:
                    raise ValueError(f"{key}[{i}]: {name!r} is not in models ({', '.join(self.models)})")
        for name, spec in self.models.items():
            try:
                describe(spec.source)
            except ModelSpecError as err:
                raise ValueError(f"models.{name}.source: {err}") from None
        for i, module in enumerate(self.task_modules):
            try:
                import_task_modules([module])
            except ImportError as err:
                raise ValueError(f"task_modules[{i}]: cannot import {module!r} ({err})") from None
        self.tasks = task_configs(self.tasks)
        if not self.tasks:
            raise ValueError("tasks: enable at least one task")
        # a task's entry stays valid while the task is switched off (--set tasks.<name>=null narrows a run);
        # a name that is no task at all is a typo
        for field_name, by_task in (("train.max_steps_by_task", self.train.max_steps_by_task),
                                    ("eval.data_efficiency", self.eval.data_efficiency),
                                    ("eval.max_new_tokens_by_task", self.eval.max_new_tokens_by_task)):
            for task in by_task:
                if task not in TASKS:
                    raise ValueError(f"{field_name}: {task!r} is not a task (known: {', '.join(sorted(TASKS))})")
        for name in self.explainers:
            conflict = precision_conflict(self.models[name].dtype, self.train.precision)
            if conflict:
                raise ValueError(f"models.{name}.dtype: {conflict}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or Path("runs") / self.name).resolve()

    @property
    def layout(self) -> RunLayout:
        """Every path of the run folder."""
        return RunLayout(self.run_dir)


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load, override and validate a run config; errors name the dotted key (and the file)."""
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def code_version() -> str:
    """git describe of the code, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_resolved(cfg: RunConfig) -> Path:
    """Write config.resolved.yaml (with the code version) into the run folder."""
    path = cfg.layout.resolved_config
    write_atomic(path, yaml.safe_dump({"code_version": code_version(), "config": to_dict(cfg)}, sort_keys=False))
    return path
