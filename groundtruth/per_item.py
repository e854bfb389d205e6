"""A per-item task's ground truth as a recipe (groundtruth/stages.py), made from its own `build_items`
and `run`, so every task's ground truth goes through one code path.

One `target` step, named `groundtruth` (its progress is the stage's): the items cut into units of
`items_per_shard`, each unit's records one raw shard, written atomically by whoever ran it and listed in
the raw manifest where the stage is driven as the unit completes. A rerun skips listed shards; a unit whose actor died is redone and its shard (same
name) replaces any partial one, so every record ends up present exactly once. Then `finish` balances
each split into train/ and test/ shards with label statistics (groundtruth/dataset.py finalize).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from .dataset import finalize, source_splits
from .faults import inject_fault
from .layout import RAW
from .records import (Record, complete_shards, read_manifest, remove_temporaries, shard_name, temporary_name,
                      write_manifest, write_shard, write_tar)
from .stages import StageContext, StagedRecipe, Step

BuildItems = Callable[[Any, int], list]
"""(task config, seed) -> work items, each with .source_id."""
RunItems = Callable[..., list]
"""(model, tokenizer, items, task config, target, split_of, batch_size) -> records."""


def per_item_recipe(build_items: BuildItems, run: RunItems, cell_of: Optional[Callable[[Record], str]] = None,
                    identity_fields: tuple[str, ...] = ()) -> StagedRecipe:
    """The recipe of a task with these items and this technique; cell_of and identity_fields are its
    spec's balance_cell and identity_fields (how its splits are balanced and its statistics read)."""
    return StagedRecipe(steps=(Step("groundtruth", "target", partial(_todo, build_items), partial(_write_unit, run),
                                    collect=_list_shard),),
                        finish=partial(_finish, cell_of, identity_fields), splits=("train", "test"),
                        plan=partial(_plan, build_items), count_items=partial(_count, build_items))


def _units(build_items: BuildItems, ctx: StageContext) -> list[tuple[int, list]]:
    """(shard index, its items) for every raw shard of the task."""
    items, per = build_items(ctx.task_cfg, ctx.seed), ctx.items_per_shard
    return [(index, items[start:start + per]) for index, start in enumerate(range(0, len(items), per))]


def _todo(build_items: BuildItems, ctx: StageContext) -> list[tuple[int, list]]:
    done = complete_shards(ctx.folder / RAW, ctx.config_hash)
    return [unit for unit in _units(build_items, ctx) if shard_name(unit[0]) not in done]


def _write_unit(run: RunItems, ctx: StageContext, unit: tuple[int, list], model, tokenizer) -> dict:
    """One unit on the target: its records as one raw shard; returns the shard's manifest entry."""
    index, items = unit
    records = run(model, tokenizer, items, ctx.task_cfg, ctx.target, source_splits(ctx), ctx.batch_size)
    path = ctx.folder / RAW / shard_name(index)
    inject_fault(index, lambda: write_tar(temporary_name(path), records[: len(records) // 2]))
    return write_shard(path, records)


def _list_shard(ctx: StageContext, unit: tuple[int, list], entry: dict) -> int:
    raw = ctx.folder / RAW
    manifest = read_manifest(raw)
    manifest.update(config_hash=ctx.config_hash, complete=False)
    manifest["shards"][shard_name(unit[0])] = entry
    write_manifest(raw, manifest)
    return entry["count"]


def _finish(cell_of: Optional[Callable[[Record], str]], identity_fields: tuple[str, ...], ctx: StageContext) -> dict:
    raw: Path = ctx.folder / RAW
    removed = remove_temporaries(raw)
    if removed:
        print(f"[groundtruth] {ctx.task}/{ctx.target}: removed {removed} half-written shard(s) of dead actors", flush=True)
    manifest = read_manifest(raw)
    manifest.update(complete=True, count=sum(e["count"] for e in manifest["shards"].values()))
    write_manifest(raw, manifest)
    return finalize(ctx.folder, ctx.task_cfg, ctx.config_hash, ctx.seed, ctx.shard_size, cell_of, identity_fields)


def _count(build_items: BuildItems, task_cfg: Any, seed: int) -> int:
    return len(build_items(task_cfg, seed))


def _plan(build_items: BuildItems, task_cfg: Any, seed: int, items_per_shard: int) -> list[str]:
    try:
        n_items = _count(build_items, task_cfg, seed)
    except (FileNotFoundError, ValueError) as err:
        return [f"items not countable here ({err})"]
    return [f"{n_items} items -> {-(-n_items // items_per_shard)} raw shards per target"]
