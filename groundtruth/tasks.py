"""The task registry: task name -> TaskSpec (groundtruth/taskspec.py), one `register_task` line per task.

A built-in task is one module that declares its `SPEC`, registered below; a task defined outside the
project calls `register_task` itself in a module the run config names (`task_modules`), imported here
and in every Ray worker. Registering a name twice raises.
"""
from __future__ import annotations

import importlib
import os

from . import ablation, answer_heads_task, head_patching_task, patching_task, token_attribution
from .features import spec as features
from .registry import register
from .taskspec import ExplanationForm, MemoryPlan, TaskSpec, TaskWork, split_records  # noqa: F401  (the API)

TASKS: dict[str, TaskSpec] = {}
"""Task name -> spec, in registration order."""


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task (a built-in one below; one defined elsewhere from its own module)."""
    return register(TASKS, spec, "task")


def task_spec(name: str) -> TaskSpec:
    """The spec of a task, or a message naming the known ones ('<task>:<set>' names its task)."""
    base = name.split(":")[0]
    if base not in TASKS:
        raise KeyError(f"unknown task {base!r} (known: {', '.join(TASKS)})")
    return TASKS[base]


TASK_MODULES_ENV = "SELFEXPLAIN_TASK_MODULES"
"""Comma-separated modules of tasks defined outside the project (the run config's task_modules). The
variable reaches every Ray worker (ray_session forwards SELFEXPLAIN_*), whose registry imports them too."""


def import_task_modules(names: list[str]) -> None:
    """Import modules that register tasks, and note them for worker processes; an unimportable one
    raises ImportError naming it."""
    for name in names:
        importlib.import_module(name)
    known = [m for m in os.environ.get(TASK_MODULES_ENV, "").split(",") if m]
    os.environ[TASK_MODULES_ENV] = ",".join(dict.fromkeys(known + list(names)))


register_task(ablation.SPEC)
register_task(patching_task.SPEC)
register_task(features.SPEC)
register_task(head_patching_task.SPEC)
register_task(token_attribution.SPEC)
register_task(answer_heads_task.SPEC)

for _module in filter(None, os.environ.get(TASK_MODULES_ENV, "").split(",")):  # in a worker: the run's own
    importlib.import_module(_module)
