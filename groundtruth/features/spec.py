"""Task A, feature descriptions, in the task registry: its spec and its one `register_task` call.

The config and the helpers are in task.py, the ground-truth steps in recipe.py, the dry run's memory
plan in memory.py.
"""
from __future__ import annotations

from ..taskspec import TaskSpec, TaskWork
from .memory import feature_memory
from .recipe import FEATURE_RECIPE
from .task import OOD_SPLITS, TASK, FeatureConfig, check_inputs, simulator_of, stats_lines
from .units import FEATURE_UNITS


def _planned_records(cfg: FeatureConfig, items: int) -> tuple[int, int]:
    """Described features minus the held-out ones, and the held-out ones, every layer."""
    layers = len(cfg.layers if cfg.layers is not None else cfg.depths)
    return ((cfg.max_features_per_layer or 2000) - cfg.test_features_per_layer) * layers, \
        cfg.test_features_per_layer * layers


SPEC = TaskSpec(
    TASK, FeatureConfig, "what inputs activate this SAE feature direction of the target?", "description",
    # the paper's task A prompts: the decoder direction as the soft token and its layer
    templates=("At layer {layers}, {vec} encodes ", "What does {vec} encode at layer {layers}? ",
               "Describe the inputs that activate {vec} in layer {layers}: "), explanation_tokens=20,
    # one corpus text of max_tokens; an explainer example is template + layer + description
    work=TaskWork(target_tokens=64, explainer_tokens=60, items_per_shard=lambda cfg: cfg.texts_per_shard,
                  records=_planned_records, memory=feature_memory),
    staged=FEATURE_RECIPE, check_inputs=check_inputs, has_vectors=True, eval_splits=("test",) + OOD_SPLITS, selfie=True,
    explain_units=FEATURE_UNITS, label_stats_lines=stats_lines, simulator=simulator_of)
