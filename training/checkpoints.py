"""Resumable DeepSpeed checkpoints: saving, pruning, and resuming on a different number of ranks.

A checkpoint folder holds one tag per saved step (`step0000010/`), DeepSpeed's `latest` file and, per
tag, `selfexplain.json` with the step and the world size that wrote it. ZeRO-1/2/3 partition the
optimizer state by rank, so a checkpoint written by 4 ranks cannot be loaded by 2 as it is; resuming
on another world size converts it once to a DeepSpeed universal checkpoint (`<tag>_universal/`,
rank-independent fp32 fragments) and loads that. ZeRO-0 checkpoints do not depend on the world size.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from selfexplain.groundtruth.errors import BadInput

META = "selfexplain.json"


class ResumeError(BadInput, RuntimeError):
    """A checkpoint exists but cannot be resumed by this run (the message says what to do)."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a run restarts: the tag to load, its step, the world size that wrote it, and whether this run
    must load it as a universal checkpoint."""

    tag: str
    step: Optional[int]  # None for a checkpoint without our metadata (DeepSpeed's client state has it)
    world: int
    universal: bool = False


def latest_tag(folder: Path) -> Optional[str]:
    latest = folder / "latest"
    return latest.read_text().strip() if latest.exists() else None


def save(engine, folder: Path, step: int, world: int, rank: int, keep: int) -> None:
    """Every rank calls this. Rank 0 records step and world size and prunes all but `keep` tags."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = f"step{step:07d}"
    # universal_checkpoint_info lets ds_to_universal convert the checkpoint later (another world size)
    engine.save_checkpoint(str(folder), tag=tag, client_state={
        "step": step, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
    if rank == 0:
        (folder / tag / META).write_text(json.dumps({"step": step, "world": world}))
        tags = sorted(p for p in folder.glob("step*") if p.is_dir() and not p.name.endswith("_universal"))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def resume_point(folder: Path, world: int, zero_stage: int) -> Optional[ResumePoint]:
    """The checkpoint this run resumes from, or None to start at step 0 (reads only small files)."""
    tag = latest_tag(folder)
    if tag is None:
        return None
    meta_path = folder / tag / META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"step": None, "world": world}
    return ResumePoint(tag, meta["step"], meta["world"], universal=meta["world"] != world and zero_stage > 0)


def to_universal(folder: Path, point: ResumePoint, world: int) -> str:
    """Convert point's checkpoint to a universal one (rank 0 only; others wait at a barrier) and
    return the tag to load. Fails with a ResumeError naming both world sizes and the way out."""
    out = folder / f"{point.tag}_universal"
    if (out / "zero").is_dir():
        return out.name
    written = point.world
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(folder / point.tag), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal(args)
    except Exception as err:  # noqa: BLE001 (any failure of the converter means the same to the user)
        shutil.rmtree(out, ignore_errors=True)
        raise ResumeError(
            f"{folder}: the checkpoint at {point.tag} was written by {written} ranks and this run has {world}; "
            f"converting it to a DeepSpeed universal checkpoint failed ({type(err).__name__}: {err}). "
            f"Resume with train.num_workers={written}, or delete {folder} to start over.") from err
    return out.name


def universal_config(ds_config: dict) -> dict:
    """ds_config with universal-checkpoint loading switched on."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
