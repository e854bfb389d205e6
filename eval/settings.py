"""What eval scores, beside which explainers: the rows (untrained, v left out, zero and shuffled v, SelfIE,
trained controls, the data-efficiency curve), the baselines and the generation budget. The run config's
`eval` section holds these with the evaluator pool's own settings (distributed/config.py EvalConfig).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from selfexplain.groundtruth.tasks import TASKS
from selfexplain.training.controls import TRAINED_CONTROLS

from .baselines import BASELINES


@dataclass
class RowSettings:
    max_new_tokens: Optional[int] = None
    """Tokens per explanation; null: the task's default (50 for causal tasks, as in the paper)."""
    max_new_tokens_by_task: dict[str, int] = field(default_factory=dict)
    """Tokens per explanation for the named tasks (the others: max_new_tokens), e.g. {answer_heads: 32}.
    The eval stage warns where a budget is shorter than a scored gold explanation in the explainer's tokens."""
    max_examples: Optional[int] = None
    """Score at most this many test records per target (null: all)."""
    untrained: bool = True
    """Also score each explainer before fine-tuning."""
    no_vector: bool = True
    """For vector tasks, also score each trained explainer with the vector left out of its prompt."""
    vector_controls: bool = True
    """For vector tasks, also score each trained explainer reading a zero v and a shuffled v (another test
    record's v from the same layers): an explainer that ignores v scores the same on both."""
    trained_controls: list[str] = field(default_factory=list)
    """Controls that train an explainer of their own on the same records with the evidence removed
    (training/controls.py): text_only (vector tasks: v left out) and question_only (tasks without
    vectors: the input's content left out). Each is one more training job per explainer and target."""
    trained_controls_for: Literal["self", "all"] = "self"
    """Which explainers get the trained controls: the self-explainers (one job per target and control), or
    every explainer of every target."""
    data_efficiency: dict[str, list[int]] = field(default_factory=dict)
    """Per task, also train explainers on the first n train records per layer for each n (the paper's
    features: 64, 256, 1024): the data-efficiency curve, each size scored with its own v-controls and
    its lift over the best control tabulated in the report, plotted in W&B."""
    data_efficiency_for: Literal["self", "all"] = "self"
    """Which explainers the curve trains: the self-explainers, or every explainer of every target."""
    baselines: list[str] = field(default_factory=lambda: ["majority"])
    """Baselines to score (see eval/baselines.py); each is scored on the tasks it applies to."""
    selfie_scales: list[float] = field(default_factory=lambda: [1.0, 5.0, 10.0, 25.0, 50.0])
    """Feature descriptions: SelfIE reads v unit-normalised times each scale with the untrained
    explainer; the best scale's scores are reported (the paper's scales). Empty: no SelfIE row."""

    def budget_for(self, task: str) -> int:
        """New tokens an explainer may decode for the task's explanations."""
        return self.max_new_tokens_by_task.get(task) or self.max_new_tokens or TASKS[task].explanation_tokens

    def check(self) -> None:
        if any(n < 1 for n in self.max_new_tokens_by_task.values()):
            raise ValueError(f"max_new_tokens_by_task: every budget must be at least 1, got {self.max_new_tokens_by_task}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"baselines: unknown {sorted(unknown)} (known: {', '.join(BASELINES)})")
        unknown = set(self.trained_controls) - set(TRAINED_CONTROLS)
        if unknown:
            raise ValueError(f"trained_controls: unknown {sorted(unknown)} (known: {', '.join(TRAINED_CONTROLS)})")
        for task, sizes in self.data_efficiency.items():
            if not sizes or any(n < 1 for n in sizes):
                raise ValueError(f"data_efficiency.{task}: sizes must be at least 1 record per layer, got {sizes}")
