"""How a job's explainer reads vectors: the target layers its records' vectors come from, the Pi it
starts from (built, or an lstsq fit loaded or made), and fitting those Pi before the ranks start."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from selfexplain.groundtruth.records import MANIFEST, split_layers

from .explainer import embedding_norm
from .job import TrainJob
from .projection import Projection, fit_projection, initial_projection, key_layers, save_projection, vector_key


def _in_layer_order(keys: set[str]) -> list[str]:
    return sorted(keys, key=lambda k: key_layers(k)[0])


def vector_keys(records: list) -> list[str]:
    """The target layers (as vector keys) the records' vectors come from."""
    return _in_layer_order({vector_key(r.layers) for r in records if r.vector is not None})


def projection_keys(job: TrainJob, records: list) -> list[str]:
    """The target layers a job's Pi maps: its train records' and those of every other split of its ground
    truth (raw, test, out-of-distribution sets), so the explainer reads any test vector, also one at
    layers no train record has (a small balanced set of head patches misses some layers)."""
    train = Path(job.data_dir)
    others = {vector_key(layers) for split in sorted(train.parent.iterdir())
              if split != train and (split / MANIFEST).exists() for layers in split_layers(split)}
    return _in_layer_order(set(vector_keys(records)) | others)


def job_projection(job: TrainJob, records: list, d_explainer: int, device: Optional[str] = None):
    """The projection a job's explainer starts from, for the vector keys and size its records have (an
    lstsq fit, if it must happen here, runs its models on `device`)."""
    d_target = next(r.vector.shape[0] for r in records if r.vector is not None)
    kind = job.train.projection.kind_for(job.explainer, job.target)
    return initial_projection(job.projection_init_path, kind, projection_keys(job, records), d_target, d_explainer,
                              job.target_spec, job.explainer_spec, job.train.projection, job.seed, device)


def match_injection_norm(projection: Projection, job: TrainJob, model) -> Projection:
    """Where the job's config asks for it, make the projection rescale what it injects to the explainer's
    mean token-embedding norm (computed from `model`, the explainer it feeds)."""
    projection.norm = embedding_norm(model) if job.train.projection.match_norm else None
    return projection


def fit_for_job(job: TrainJob, keys: list[str], device: Optional[str] = None) -> Projection:
    """The lstsq Pi of a job's (explainer, target) pair over `keys`, its models on `device`."""
    return fit_projection(keys, job.target_spec, job.explainer_spec, job.train.projection, job.seed,
                          job.train.projection.is_trainable("lstsq"), device)


FitMany = Callable[[list[tuple[TrainJob, list[str]]]], list[Projection]]
"""Runs several lstsq fits, each a (job, keys), and returns their Pi in order."""


def fit_each(fits: list[tuple[TrainJob, list[str]]]) -> list[Projection]:
    """The fits one after another in this process."""
    return [fit_for_job(job, keys) for job, keys in fits]


def prefit_projections(jobs: list[TrainJob], fit_many: FitMany = fit_each) -> None:
    """Fit the lstsq projections of jobs before their ranks start (they then load them instead of each
    fitting). Jobs of one (explainer, target) pair share one fit over the union of their keys (both
    models run over the fit passages once for every task), saved per job as its keys' subset.
    `fit_many` runs the pairs' fits (distributed/ runs them side by side as Ray tasks, each holding a
    GPU where there are GPUs)."""
    groups: dict[str, list[tuple[TrainJob, list[str]]]] = {}
    for job in jobs:
        if job.train.projection.kind_for(job.explainer, job.target) != "lstsq" or job.target_spec is None:
            continue
        records = job.records()
        if not any(r.vector is not None for r in records):  # also a control trained without v
            continue
        keys = projection_keys(job, records)
        if job.projection_init_path.exists() and Projection.load(job.projection_init_path).keys == keys:
            continue
        pair = json.dumps([asdict(job.explainer_spec), asdict(job.target_spec), asdict(job.train.projection), job.seed],
                          sort_keys=True)
        groups.setdefault(pair, []).append((job, keys))
    unions = [sorted({k for _, keys in members for k in keys}, key=lambda k: [int(x) for x in k.split("-")])
              for members in groups.values()]
    fitted = fit_many([(members[0][0], union) for members, union in zip(groups.values(), unions)])
    for members, shared in zip(groups.values(), fitted):
        for member, keys in members:
            save_projection(shared.subset(keys), member.projection_init_path)
