"""Explain units of a per-item task (TaskSpec.explain_units): chunks of the task's work items, the
explainer's questions about them built without the technique, and the technique run on a sample.

A per-item task gives `explain_queries(model, tokenizer, items, cfg, target, split_of)`, the records its
`run` would make with the labels left out; its `run` itself is the ground truth of a validation sample.
"""
from __future__ import annotations

from typing import Callable, Optional

from .dataset import UNANSWERED, source_splits
from .records import Record
from .stages import StageContext
from .taskspec import ExplainUnits


def per_item_units(build_items: Callable, run: Callable, queries: Callable, needs_target: bool,
                   unit_name: str, units_per_item: Callable = lambda task_cfg: 1,
                   items_of_inputs: Optional[Callable] = None, with_source: Optional[Callable] = None) -> ExplainUnits:
    """ExplainUnits of a task whose ground truth is `run` over the items `build_items` gives;
    items_of_inputs(task config, inputs) makes items of a person's own prompts, with_source(task config,
    a prompts file) the config whose items are that file's (`selfexplain explain --source`)."""

    def chunks(ctx: StageContext, size: int) -> list[list]:
        items = build_items(ctx.task_cfg, ctx.seed)
        return [items[i:i + size] for i in range(0, len(items), size)]

    def chunk_queries(ctx: StageContext, chunk: list, model, tokenizer) -> list[Record]:
        return queries(model, tokenizer, chunk, ctx.task_cfg, ctx.target, source_splits(ctx))

    def truth(ctx: StageContext, records: list[Record], model, tokenizer) -> list[Record]:
        """The technique on every item of the sampled units' sources (records identify their source, not
        their item); the units asked about are kept, those it could not label (no answer) left out."""
        wanted, sources = {r.record_id for r in records}, {r.source_id for r in records}
        items = [item for item in build_items(ctx.task_cfg, ctx.seed) if item.source_id in sources]
        labelled = run(model, tokenizer, items, ctx.task_cfg, ctx.target, source_splits(ctx), ctx.batch_size)
        return [r for r in labelled if r.record_id in wanted and not r.query.get(UNANSWERED)]

    def of_inputs(task_cfg, inputs: list, model, tokenizer, target: str) -> list[Record]:
        return queries(model, tokenizer, items_of_inputs(task_cfg, inputs), task_cfg, target, lambda source: "test")

    return ExplainUnits(chunks, chunk_queries, truth, needs_target, unit_name=unit_name, units_per_item=units_per_item,
                        of_inputs=of_inputs if items_of_inputs else None,
                        with_source=(lambda task_cfg, source, layers: with_source(task_cfg, source)) if with_source else None)
