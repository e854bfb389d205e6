"""Ground truth for feature descriptions, spread over the cluster in four resumable steps:

1. activations: the ground-truth actor pool (one target copy per actor) turns units of corpus texts
   into activation shards (`work/<hash>/activations/shard-*/`, one memory-mapped .npy per layer,
   written atomically);
2. SAEs: one Ray task per layer trains an SAE on all shards (or loads the pretrained one) and saves
   it with its L0, explained variance and dead fraction (`sae/layer_<l>/`);
3. exemplars: one Ray task per activation shard mines every feature's top contexts, streaming the
   SAE codes in chunks (`exemplars/shard-*/layer_<l>.json`);
4. the driver merges the exemplars layer by layer, describes every feature (best candidate by simulation score),
   holds out whole features per layer for test and writes the train/test shards;
5. the out-of-distribution sets ACT (raw activations read back from the activation shards) and dACT
   (activation differences of prompt pairs, from one target actor) for the test features.

Each Ray task computes on the GPU it reserves (groundtruth.actor_gpus), on the CPU without one.
Every step skips what a previous run finished; the work folder is keyed by a hash of the task config,
target and seed, so a changed config never reads stale intermediate files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from groundtruth.features.activations import ActivationBatch
from groundtruth.features.exemplars import FeatureExemplars, merge_exemplars
from groundtruth.features.task import (corpus_texts, description_stats, feature_records, make_describers,
                                       simulator_of, split_features)
from groundtruth.layout import LABEL_STATS
from groundtruth.models import prepare
from groundtruth.records import read_manifest, shard_name, write_split

from .actor_pool import run_pool
from .config import RunConfig
from .ray_session import torch_threads


METRIC_TOKENS = 50_000  # tokens a pretrained SAE's L0 / explained variance / dead fraction are measured on


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _run_tasks(fn, args: list[tuple], desc: str) -> list:
    """fn.remote(*a) for every a, results in order, with a progress bar (Ray retries lost tasks)."""
    import ray

    refs = [fn.remote(*a) for a in args]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, dynamic_ncols=True) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[index[ready[0]]] = ray.get(ready[0])
            bar.update(1)
    return results


def train_layer_sae(shards: list[str], layer: int, sae_cfg, seed: int, out: str, threads: int) -> dict:
    """Step 2 for one layer: train (or load) the SAE, save it, return its metrics."""
    import torch

    from groundtruth.features.sae import load_sae, sae_metrics, save_sae, train_sae

    torch.set_num_threads(threads)
    parts, tokens = [], 0
    for shard in shards:  # this layer's file of each shard; a pretrained SAE is only measured on a sample
        if sae_cfg.pretrained and tokens >= METRIC_TOKENS:
            break
        parts.append(ActivationBatch.load(shard).acts[layer])
        tokens += len(parts[-1])
    acts = np.concatenate(parts)
    sae = load_sae(sae_cfg.pretrained, layer) if sae_cfg.pretrained else train_sae(acts, sae_cfg, seed)
    save_sae(sae, Path(out))
    metrics = {"layer": layer, "source": sae_cfg.pretrained or "trained here", **sae_metrics(sae, acts)}
    _write_json(Path(out) / "metrics.json", metrics)
    return metrics


def mine_shard(shard: str, index: int, sae_dirs: dict[int, str], task_cfg, seed: int, out: str, threads: int) -> int:
    """Step 3 for one activation shard: every feature's exemplars in it, one file per layer (written into
    a temporary folder renamed when every layer is done)."""
    import shutil

    import torch

    from groundtruth.features.exemplars import mine_exemplars
    from groundtruth.features.sae import encoder, load_sae
    from groundtruth.models import default_device

    torch.set_num_threads(threads)
    batch = ActivationBatch.load(shard)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for layer, folder in sae_dirs.items():
        mined = mine_exemplars(batch, layer, encoder(load_sae(folder, layer)), task_cfg.top_k, task_cfg.negatives,
                               seed=seed, shard=index, chunk_tokens=task_cfg.mine_chunk_tokens, device=default_device())
        _write_json(tmp / f"layer_{layer}.json", {str(f): ex.to_json() for f, ex in mined.items()})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return len(batch.tokens)


def run_feature_groundtruth(cfg: RunConfig, task: str, task_cfg, target: str, folder: Path, config_hash: str) -> dict:
    """All five steps for one target; returns the label statistics (also in label_stats.json)."""
    import ray

    from .gt_pool import GroundTruthWorker

    stats_path = folder / LABEL_STATS
    manifests = [read_manifest(folder / split) for split in ("train", "test")]
    if stats_path.exists() and all(m.get("config_hash") == config_hash and m.get("complete") for m in manifests):
        return json.loads(stats_path.read_text())
    pc = cfg.groundtruth
    work = folder / "work" / config_hash[:16]
    acts_dir, sae_root, ex_dir = work / "activations", work / "sae", work / "exemplars"
    for d in (acts_dir, sae_root, ex_dir):
        d.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts(task_cfg, cfg.seed)
    units = [texts[i:i + task_cfg.texts_per_shard] for i in range(0, len(texts), task_cfg.texts_per_shard)]
    shard_paths = [acts_dir / Path(shard_name(i)).stem for i in range(len(units))]

    # 1. activations on the actor pool
    todo = [i for i, p in enumerate(shard_paths) if not p.exists()]
    if todo:
        model_spec = cfg.models[target]
        prepare(model_spec)
        actor_cls = ray.remote(num_cpus=pc.actor_cpus, num_gpus=pc.actor_gpus, max_restarts=0)(GroundTruthWorker)
        run_pool(make_actor=lambda: actor_cls.remote(model_spec, torch_threads(pc.actor_cpus)), n_actors=pc.actors,
                 units=todo, call=lambda actor, i: actor.activations.remote(task_cfg, units[i], str(shard_paths[i]), pc.batch_size),
                 on_result=lambda i, n: n, max_retries=pc.max_retries, desc=f"activations {target}")
    layers = ActivationBatch.layers_in(shard_paths[0])

    # 2. one SAE per layer
    sae_dirs = {l: str(sae_root / f"layer_{l}") for l in layers}
    options = {"num_cpus": pc.actor_cpus, "num_gpus": pc.actor_gpus, "max_retries": pc.max_retries}
    missing = [l for l in layers if not (Path(sae_dirs[l]) / "metrics.json").exists()]
    if missing:
        _run_tasks(ray.remote(**options)(train_layer_sae),
                   [([str(p) for p in shard_paths], l, task_cfg.sae, cfg.seed, sae_dirs[l], torch_threads(pc.actor_cpus))
                    for l in missing], desc=f"SAEs {target}")
    sae_metrics = {str(l): json.loads((Path(sae_dirs[l]) / "metrics.json").read_text()) for l in layers}

    # 3. exemplars per activation shard
    ex_paths = [ex_dir / p.name for p in shard_paths]
    todo = [i for i, p in enumerate(ex_paths) if not p.exists()]
    if todo:
        _run_tasks(ray.remote(**options)(mine_shard),
                   [(str(shard_paths[i]), i, sae_dirs, task_cfg, cfg.seed + i, str(ex_paths[i]),
                     torch_threads(pc.actor_cpus)) for i in todo], desc=f"exemplars {target}")

    # 4. describe, hold out features, write the splits
    from groundtruth.features.sae import decoder_directions, load_sae

    describers, simulator = make_describers(task_cfg), simulator_of(task_cfg)
    records = []
    for layer in layers:  # one layer's exemplars in memory at a time, folded in shard by shard
        merged: dict = {}
        for p in ex_paths:
            part = {int(f): FeatureExemplars.from_json(ex) for f, ex in json.loads((p / f"layer_{layer}.json").read_text()).items()}
            merged = merge_exemplars([merged, part], task_cfg.top_k, task_cfg.negatives)
        directions = decoder_directions(load_sae(sae_dirs[layer], layer))
        described = feature_records(merged, directions, layer, target, task_cfg, describers, simulator)
        tqdm.write(f"[groundtruth] {task}/{target} layer {layer}: {len(merged)} features fired, {len(described)} described")
        records += described
    train, test = split_features(records, task_cfg, cfg.seed)
    if not train or not test:
        raise ValueError(f"{task}/{target}: {len(records)} describable features are too few for a train and a test "
                         f"split; use more corpus_texts, a larger sae.d_sae or a lower min_exemplars")
    ood = ood_sets(cfg, target, test, shard_paths)
    stats = {"sae": sae_metrics, "raw": description_stats(records)}
    for split, chosen in (("train", train), ("test", test), *ood.items()):
        write_split(folder / split, chosen, config_hash, pc.shard_size)
        stats[split] = description_stats(chosen)
    _write_json(stats_path, stats)
    return stats


def ood_sets(cfg: RunConfig, target: str, test: list, shard_paths: list[Path]) -> dict[str, list]:
    """Step 5: the ACT and dACT records of the test features."""
    import ray

    from groundtruth.features.ood import act_records, dact_records

    from .gt_pool import GroundTruthWorker

    loaded: dict[int, ActivationBatch] = {}

    def activation_at(shard: int, index: int, layer: int) -> np.ndarray:
        if shard not in loaded:
            loaded[shard] = ActivationBatch.load(shard_paths[shard])
        return loaded[shard].acts[layer][index]

    pc = cfg.groundtruth
    actor = ray.remote(num_cpus=pc.actor_cpus, num_gpus=pc.actor_gpus)(GroundTruthWorker).remote(
        cfg.models[target], torch_threads(pc.actor_cpus))
    try:
        dact = dact_records(test, lambda texts, layer: ray.get(actor.last_token_states.remote(texts, layer, pc.batch_size)))
    finally:
        ray.kill(actor, no_restart=True)
    return {"act": act_records(test, activation_at), "dact": dact}
