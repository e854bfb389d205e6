"""`selfexplain explain` in one process: a trained explainer's answer about every unit its task declares
(TaskSpec.explain_units), written as resumable JSON-lines shards, and the plan of that work.

    job = ExplainJob(ctx, export, out, ...)           # ctx: the run's (task, target) ground-truth context
    worker = UnitExplainer(job)
    for index, chunk in enumerate(job.chunks()):
        write_rows(Path(job.out) / shard_file(index), worker.rows(chunk))   # one shard-*.jsonl per chunk

A shard is one chunk of the task's work (latents of one SAE, pairs, inputs); its rows are
{unit, source_id, layers, prompt, question, query, explanation, trained_on}. distributed/explain_pool.py
spreads the chunks over Ray actors; a rerun skips the shards the manifest lists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from selfexplain.groundtruth.errors import ConfigError
from selfexplain.groundtruth.records import Record, sha256_file, write_atomic
from selfexplain.groundtruth.stages import StageContext
from selfexplain.groundtruth.taskspec import ExplainUnits
from selfexplain.groundtruth.tasks import TASKS

from .explainer_api import Explainer, unit_row


def shard_file(index: int) -> str:
    return f"shard-{index:06d}.jsonl"


@dataclass(frozen=True)
class ExplainJob:
    """One explainer asked about every unit of one task on one target; picklable for Ray actors."""

    ctx: StageContext
    """The run's (task, target) ground-truth context: the units come from it (its SAEs, its items)."""
    export: str
    """The explainer's export folder."""
    out: str
    """explain/<task>/<explainer>_on_<target>."""
    explainer: str
    chunk_size: int
    limit: Optional[int]
    """At most this many work items (latents, pairs, inputs), the first in chunk order; None: all."""
    layers: Optional[tuple[int, ...]]
    """Only units at these layers (an SAE's layer; a patching block containing one); None: all."""
    max_new_tokens: int
    batch_size: int
    trained_on: frozenset[str]
    """Source ids of the explainer's training records: their units are marked, and never validated."""
    source: Optional[str] = None
    """Units of another source than the run analysed (--source: an SAE folder or release); ctx is then
    the explain folder's own ground-truth context, made by the task's `prepare` steps."""

    @property
    def units(self) -> ExplainUnits:
        return task_units(self.ctx.task)

    def chunks(self) -> list:
        """The work in chunks (each sized and cut like a list of work items), cut at `limit` work items."""
        chunks = self.units.chunks(self.ctx, self.chunk_size)
        if self.limit is None:
            return chunks
        kept, left = [], self.limit
        for chunk in chunks:
            if left <= 0:
                break
            kept.append(chunk[:left])
            left -= len(chunk)
        return kept


def task_units(task: str) -> ExplainUnits:
    """What `selfexplain explain` asks about for a task; a task that declares nothing is refused."""
    units = TASKS[task].explain_units
    if units is None:
        raise ConfigError(f"task {task!r} declares no explain units")
    return units


def row_record(row: dict, task: str, target: str) -> Record:
    """A row as an unlabelled record (no vector): what a task's truth needs to find its unit."""
    return Record(record_id=row["unit"], task=task, target=target, split="explain", source_id=row["source_id"],
                  prompt=row["prompt"], question=row["question"], explanation="", changed=False, output_before="",
                  output_after="", layers=row["layers"], query=dict(row["query"]))


class UnitExplainer:
    """One process's explainer, and the target where the task's questions need it (loaded on first use)."""

    def __init__(self, job: ExplainJob, device: Optional[str] = None):
        self.job = job
        self.explainer = Explainer.load(job.export, device)
        self._target = None

    def target(self) -> tuple:
        if self._target is None:
            from selfexplain.groundtruth.models import load_model

            self._target = load_model(self.job.ctx.model)
        return self._target

    def queries(self, chunk) -> list[Record]:
        """The chunk's units as records, filtered to the job's layers."""
        job = self.job
        model, tokenizer = self.target() if job.units.needs_target else (None, None)
        records = job.units.queries(job.ctx, chunk, model, tokenizer)
        if job.layers:
            records = [r for r in records if set(r.layers) & set(job.layers)]
        return records

    def rows(self, chunk) -> list[dict]:
        """The explainer's answer about every unit of a chunk."""
        records = self.queries(chunk)
        answers = self.explainer.explain(records, self.job.max_new_tokens, self.job.batch_size) if records else []
        return [unit_row(r, a, self.job.trained_on) for r, a in zip(records, answers)]


def write_rows(path: Path, rows: list[dict]) -> dict:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return {"count": len(rows), "sha256": sha256_file(path)}


def read_rows(folder: Path, manifest: dict) -> list[dict]:
    """Every row of the shards a manifest lists, in shard order."""
    rows = []
    for name in sorted(manifest["shards"]):
        rows += [json.loads(line) for line in (folder / name).read_text().splitlines() if line]
    return rows
