"""A trained explainer from a notebook: load an export folder, ask it about vectors or records.

    from selfexplain import Explainer

    explainer = Explainer.load("runs/quickstart/explainers/feature_descriptions/smollm2_on_smollm2/export")
    explainer.describe(sae.W_dec[:8], layer=15)      # one description per feature direction
    explainer.explain(records)                       # any task's records, as eval asks them

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
from selfexplain.training.explainer import Projection
from selfexplain.training.export import load_explainer, read_metadata

from .generate import explain


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

    def explain(self, records: list[Record], max_new_tokens: Optional[int] = None, batch_size: int = 64,
                with_vector: bool = True) -> list[str]:
        """The explainer's greedy answer to each record's question (its v, where it has one, injected;
        with_vector=False: the question with v left out, the no-vector control)."""
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
        return self.explain(records, max_new_tokens, batch_size)
