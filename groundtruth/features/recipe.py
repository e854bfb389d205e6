"""Task A's ground truth as a recipe of steps (see groundtruth/stages.py), one target at a time:

1. activations (target): units of `texts_per_shard` corpus texts -> activation shards
   (`work/activations/shard-*/`, one memory-mapped .npy per layer, written atomically);
2. saes (task): one SAE per layer trained on all shards (or the pretrained one loaded), saved with its
   L0, explained variance and dead fraction (`work/sae/layer_<l>/`);
3. exemplars (task): per activation shard, every feature's top contexts, the SAE codes streamed in
   chunks (`work/exemplars/shard-*/layer_<l>.json`);
4. describe (driver): exemplars merged layer by layer, every feature described (best candidate by
   simulation score), whole features held out per layer for test; train/ and test/ written;
5. ood (target): the out-of-distribution sets ACT (raw activations read back from the activation
   shards) and dACT (activation differences of prompt pairs, run on the target) of the test features.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..dataset import DegenerateSetError
from ..records import iter_records, shard_name, write_split
from ..stages import StageContext, StagedRecipe, Step, write_json
from .activations import ActivationBatch
from .exemplars import FeatureExemplars, merge_exemplars
from .sae import METRIC_TOKENS
from .task import (corpus_texts, description_stats, feature_records, make_describers, simulator_of, split_features,
                   target_layers)

DESCRIBED = "described.json"  # in the work folder: SAE metrics and label statistics of train / test
OOD = "ood.json"  # in the work folder: label statistics of the ACT / dACT sets


def _acts(ctx: StageContext) -> Path:
    return ctx.work / "activations"


def _shards(ctx: StageContext) -> list[Path]:
    n = -(-ctx.task_cfg.corpus_texts // ctx.task_cfg.texts_per_shard)
    return [_acts(ctx) / Path(shard_name(i)).stem for i in range(n)]


def sae_layers(ctx: StageContext) -> list[int]:
    return ActivationBatch.layers_in(_shards(ctx)[0])


def sae_dir(ctx: StageContext, layer: int) -> Path:
    return ctx.work / "sae" / f"layer_{layer}"


def _exemplars(ctx: StageContext, shard: int) -> Path:
    return ctx.work / "exemplars" / _shards(ctx)[shard].name


# ---------------------------------------------------------------- 1. activations
def activation_units(ctx: StageContext) -> list[tuple[int, list[str]]]:
    """(shard index, its texts) of every activation shard not written yet."""
    per = ctx.task_cfg.texts_per_shard
    missing = [i for i, p in enumerate(_shards(ctx)) if not p.exists()]
    texts = corpus_texts(ctx.task_cfg, ctx.seed) if missing else []
    return [(i, texts[i * per:(i + 1) * per]) for i in missing]


def write_activation_shard(ctx: StageContext, unit: tuple[int, list[str]], model, tokenizer) -> int:
    from .activations import write_activations

    index, texts = unit
    layers = target_layers(ctx.task_cfg, model.config.num_hidden_layers)
    return write_activations(model, tokenizer, texts, layers, _shards(ctx)[index], ctx.batch_size,
                             ctx.task_cfg.max_tokens)


# ---------------------------------------------------------------- 2. SAEs
def sae_units(ctx: StageContext) -> list[int]:
    return [l for l in sae_layers(ctx) if not (sae_dir(ctx, l) / "metrics.json").exists()]


def train_layer_sae(ctx: StageContext, layer: int) -> dict:
    """Train (or load) the layer's SAE, save it with its metrics."""
    from .sae import load_sae, sae_metrics, save_sae, train_sae

    sae_cfg = ctx.task_cfg.sae
    parts, tokens = [], 0
    for shard in _shards(ctx):  # this layer's file of each shard; a pretrained SAE is only measured on a sample
        if sae_cfg.pretrained and tokens >= METRIC_TOKENS:
            break
        parts.append(ActivationBatch.load(shard).acts[layer])
        tokens += len(parts[-1])
    acts = np.concatenate(parts)
    sae = load_sae(sae_cfg.pretrained, layer) if sae_cfg.pretrained else train_sae(acts, sae_cfg, ctx.seed)
    out = sae_dir(ctx, layer)
    save_sae(sae, out)
    metrics = {"layer": layer, "source": sae_cfg.pretrained or "trained here", **sae_metrics(sae, acts)}
    write_json(out / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------- 3. exemplars
def exemplar_units(ctx: StageContext) -> list[int]:
    return [i for i in range(len(_shards(ctx))) if not _exemplars(ctx, i).exists()]


def mine_shard(ctx: StageContext, index: int) -> int:
    """Every feature's exemplars in one activation shard, one file per layer (in a temporary folder
    renamed when every layer is done)."""
    from ..models import default_device
    from .exemplars import mine_exemplars
    from .sae import encoder, load_sae

    cfg = ctx.task_cfg
    batch = ActivationBatch.load(_shards(ctx)[index])
    out = _exemplars(ctx, index)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for layer in sae_layers(ctx):
        mined = mine_exemplars(batch, layer, encoder(load_sae(str(sae_dir(ctx, layer)), layer)), cfg.top_k,
                               cfg.negatives, seed=ctx.seed + index, shard=index, chunk_tokens=cfg.mine_chunk_tokens,
                               device=default_device())
        write_json(tmp / f"layer_{layer}.json", {str(f): ex.to_json() for f, ex in mined.items()})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return len(batch.tokens)


# ---------------------------------------------------------------- 4. describe and split
def describe_units(ctx: StageContext) -> list[int]:
    return [] if ctx.complete("train", "test") and (ctx.work / DESCRIBED).exists() else [0]


def merged_exemplars(ctx: StageContext, layer: int) -> dict[int, FeatureExemplars]:
    """A layer's exemplars over all shards, folded in shard by shard (one layer in memory at a time)."""
    cfg, merged = ctx.task_cfg, {}
    for i in range(len(_shards(ctx))):
        text = (_exemplars(ctx, i) / f"layer_{layer}.json").read_text()
        part = {int(f): FeatureExemplars.from_json(ex) for f, ex in json.loads(text).items()}
        merged = merge_exemplars([merged, part], cfg.top_k, cfg.negatives)
    return merged


def describe_and_split(ctx: StageContext, _unit: int) -> None:
    from .sae import decoder_directions, load_sae

    cfg = ctx.task_cfg
    describers, simulator = make_describers(cfg), simulator_of(cfg)
    records = []
    for layer in sae_layers(ctx):
        merged = merged_exemplars(ctx, layer)
        directions = decoder_directions(load_sae(str(sae_dir(ctx, layer)), layer))
        described = feature_records(merged, directions, layer, ctx.target, cfg, describers, simulator)
        tqdm.write(f"[groundtruth] {ctx.task}/{ctx.target} layer {layer}: {len(merged)} features fired, "
                   f"{len(described)} described")
        records += described
    train, test = split_features(records, cfg, ctx.seed)
    if not train or not test:
        raise DegenerateSetError(f"{ctx.task}/{ctx.target}: {len(records)} describable features are too few for a train "
                         "and a test split; use more corpus_texts, a larger sae.d_sae or a lower min_exemplars")
    sae = {str(l): json.loads((sae_dir(ctx, l) / "metrics.json").read_text()) for l in sae_layers(ctx)}
    stats = {"sae": sae, "raw": description_stats(records)}
    for split, chosen in (("train", train), ("test", test)):
        write_split(ctx.folder / split, chosen, ctx.config_hash, ctx.shard_size)
        stats[split] = description_stats(chosen)
    write_json(ctx.work / DESCRIBED, stats)
    (ctx.work / OOD).unlink(missing_ok=True)  # the ACT / dACT sets are of the test features just written


# ---------------------------------------------------------------- 5. out-of-distribution sets
def ood_units(ctx: StageContext) -> list[int]:
    return [] if ctx.complete("act", "dact") and (ctx.work / OOD).exists() else [0]


def last_token_states(model, tokenizer, texts: list[str], layer: int, batch_size: int) -> np.ndarray:
    """The residual stream after `layer` at each text's last token: [n, d]."""
    import torch

    from ..patching import clean_runs

    states = []
    for start in range(0, len(texts), batch_size):
        ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts[start:start + batch_size]]
        states += [run.states[layer + 1, -1].float().cpu().numpy() for run in clean_runs(model, ids)]
    return np.stack(states)


def write_ood_sets(ctx: StageContext, _unit: int, model, tokenizer) -> None:
    from .ood import act_records, dact_records

    test = list(iter_records(ctx.folder / "test"))
    loaded: dict[int, ActivationBatch] = {}

    def activation_at(shard: int, index: int, layer: int) -> np.ndarray:
        if shard not in loaded:
            loaded[shard] = ActivationBatch.load(_shards(ctx)[shard])
        return loaded[shard].acts[layer][index]

    sets = {"act": act_records(test, activation_at),
            "dact": dact_records(test, lambda texts, layer: last_token_states(model, tokenizer, texts, layer,
                                                                             ctx.batch_size))}
    for split, chosen in sets.items():
        write_split(ctx.folder / split, chosen, ctx.config_hash, ctx.shard_size)
    write_json(ctx.work / OOD, {split: description_stats(chosen) for split, chosen in sets.items()})


def finish(ctx: StageContext) -> dict:
    from ..layout import LABEL_STATS

    stats = {**json.loads((ctx.work / DESCRIBED).read_text()), **json.loads((ctx.work / OOD).read_text())}
    write_json(ctx.folder / LABEL_STATS, stats)
    return stats


def plan(cfg, seed: int, items_per_shard: int) -> list[str]:
    """The recipe's dry-run lines (its shards are cut by texts_per_shard)."""
    n_shards = -(-cfg.corpus_texts // cfg.texts_per_shard)
    layers = cfg.layers if cfg.layers is not None else f"at depths {cfg.depths}"
    sae = (f"pretrained {cfg.sae.pretrained}" if cfg.sae.pretrained else
           f"TopK SAEs trained here (d_sae {cfg.sae.d_sae}, k {cfg.sae.k}, {cfg.sae.steps} steps)")
    return [f"{cfg.corpus_texts} texts of {', '.join(cfg.corpus)} -> {n_shards} activation shards per target; "
            f"layers {layers}; {sae}",
            f"  describers {', '.join(cfg.describers)}, simulator {cfg.simulator}, judge {cfg.judge}; "
            f"{cfg.test_features_per_layer} held-out features per layer"]


FEATURE_RECIPE = StagedRecipe(
    steps=(Step("activations", "target", activation_units, write_activation_shard),
           Step("SAEs", "task", sae_units, train_layer_sae),
           Step("exemplars", "task", exemplar_units, mine_shard),
           Step("describe", "driver", describe_units, describe_and_split),
           Step("ood sets", "target", ood_units, write_ood_sets)),
    finish=finish, splits=("train", "test", "act", "dact"), plan=plan,
    count_items=lambda cfg, seed: cfg.corpus_texts)
