"""A trained explainer from a notebook: load an export folder, ask it about vectors or records.

    from selfexplain import Explainer

    explainer = Explainer.load("runs/quickstart/explainers/feature_descriptions/smollm2_on_smollm2/export")
    explainer.describe(sae.W_dec[:8], layer=15)      # one description per feature direction
    explainer.explain(records)                       # any task's records, as eval asks them
    ablation.explain(["Paris is in France. The capital of France is"])   # a person's own prompts:
        # one row per unit the task makes of them (here: each sentence but the last, removed)
    patching.explain(counterfact_records, target=(model, tokenizer))      # v read from the target's x' runs

The export's metadata says which task it was trained on, on which target, and how its prompts were
formatted; Pi (a cross-explainer's projection) comes with it and maps each v the way training did.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from selfexplain.groundtruth.records import Record
from selfexplain.groundtruth.tasks import TASKS
from selfexplain.training.projection import Projection
from selfexplain.training.export import load_explainer, read_metadata

from .generate import explain


BULKY_QUERY_FIELDS = ("exemplars", "candidates")
"""Query fields left out of a unit's row (the ground truth keeps them)."""


def unit_row(record: Record, answer: str, trained_on: frozenset[str]) -> dict:
    """One unit's question and the explainer's answer, as `selfexplain explain` writes it."""
    query = {k: v for k, v in record.query.items() if k not in BULKY_QUERY_FIELDS}
    return {"unit": record.record_id, "source_id": record.source_id, "layers": record.layers, "prompt": record.prompt,
            "question": record.question, "query": query, "explanation": answer.strip(),
            "trained_on": record.source_id in trained_on}


@dataclass
class Explainer:
    model: Any
    tokenizer: Any
    projection: Optional[Projection]
    metadata: dict
    """The export's selfexplain.json: task, target, explainer, training settings."""

    @classmethod
    def load(cls, folder: Union[str, Path], device: Optional[str] = None) -> "Explainer":
        meta = read_metadata(Path(folder))
        model, tokenizer, projection = load_explainer(Path(folder), device=device)
        return cls(model.eval(), tokenizer, projection, meta)

    @property
    def task(self) -> str:
        return self.metadata["task"]

    def explain(self, inputs: list, max_new_tokens: Optional[int] = None, batch_size: int = 64,
                with_vector: bool = True, task_config: Any = None, target: Optional[tuple] = None) -> list:
        """Records (any task's, as eval asks them): the explainer's greedy answer to each record's question,
        in order, as strings (its v, where it has one, injected; with_vector=False: the question with v
        left out, the no-vector control).

        A person's own prompts, as the task's prompts file holds them (input ablation: a prompt string or
        {"prompt", "spans", "id"}; activation patching: CounterFact records): one row per unit the task
        makes of them ({unit, source_id, layers, prompt, question, query, explanation}, as `selfexplain
        explain` writes), by the task's own code. task_config: the task's config (default: its defaults);
        target: the target's (model, tokenizer), where the questions need its runs (patching's v)."""
        if all(isinstance(item, Record) for item in inputs):
            return self._answers(inputs, max_new_tokens, batch_size, with_vector)
        records = self.units_of(inputs, task_config, target)
        answers = self._answers(records, max_new_tokens, batch_size, with_vector)
        return [unit_row(r, a, frozenset()) for r, a in zip(records, answers)]

    def units_of(self, inputs: list, task_config: Any = None, target: Optional[tuple] = None) -> list[Record]:
        """The task's questions about a person's own prompts (see explain), unlabelled."""
        spec = TASKS[self.task]
        units = spec.explain_units
        if units is None or units.of_inputs is None:
            raise ValueError(f"explain: task {self.task!r} makes no units of prompts; ask it about records")
        if units.needs_target and target is None:
            raise ValueError(f"explain: {self.task!r} runs the target to ask its questions: pass target=(model, tokenizer)")
        model, tokenizer = target if units.needs_target else (None, None)
        return units.of_inputs(task_config or spec.config(), inputs, model, tokenizer, self.metadata["target"])

    def _answers(self, records: list[Record], max_new_tokens: Optional[int], batch_size: int,
                 with_vector: bool) -> list[str]:
        tokens = max_new_tokens or TASKS[self.task].explanation_tokens
        return explain(self.model, self.tokenizer, records, self.metadata["train"]["prompt_format"], tokens,
                       batch_size, self.projection, with_vector)

    def describe(self, vectors: Union[np.ndarray, torch.Tensor], layer: int, max_new_tokens: Optional[int] = None,
                 batch_size: int = 64) -> list[str]:
        """One description per vector ([N, d_target], e.g. SAE decoder directions of the target's `layer`),
        asked as the feature-description task asks about a feature."""
        spec = TASKS[self.task]
        if not spec.has_vectors or any("{prompt}" in t or "{question}" in t for t in spec.templates):
            raise ValueError(f"describe: {self.task!r} asks about a vector together with a prompt; describe is for "
                             "tasks whose question is a vector alone (use explain with that task's records)")
        array = vectors.detach().cpu().float().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, np.float32)
        if array.ndim != 2:
            raise ValueError(f"describe: vectors must be [N, d], got shape {array.shape}")
        target = self.metadata["target"]
        records = [Record(record_id=f"v{i}", task=self.task, target=target, split="test", source_id=f"v{i}", prompt="",
                          question="", explanation="", changed=False, output_before="", output_after="",
                          layers=[layer], vector=row) for i, row in enumerate(array)]
        return self._answers(records, max_new_tokens, batch_size, True)
