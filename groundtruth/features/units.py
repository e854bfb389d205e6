"""Explain units of feature descriptions (TaskSpec.explain_units): every latent of every SAE the run's
ground truth made or loaded, described or not, and the recipe's own describe step as the ground truth of
a validation sample (the latents' exemplars mined over the run's corpus, the best candidate description
by simulation).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from ..errors import DataSourceError
from ..records import Record, safe_key
from ..stages import StageContext
from ..taskspec import ExplainUnits
from .recipe import FEATURE_RECIPE, merged_exemplars, sae_dir, sae_layers
from .task import TASK, FeatureConfig, feature_records, make_describers, simulator_of


def _width(ctx: StageContext, layer: int) -> int:
    """Latents of the layer's SAE, from its sae-lens config (no weights loaded)."""
    return int(json.loads((sae_dir(ctx, layer) / "cfg.json").read_text())["d_sae"])


@dataclass(frozen=True)
class LatentRange:
    """Latents [start, end) of one layer's SAE: a chunk of work, sized and cut like a list of latents."""

    layer: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, cut: slice) -> "LatentRange":
        first, stop, _ = cut.indices(len(self))
        return LatentRange(self.layer, self.start + first, self.start + max(first, stop))


def chunks(ctx: StageContext, size: int) -> list[LatentRange]:
    """Every layer's SAE latents, `size` at a time: the SAEs the run's ground
    truth made or loaded, or before it ran (a dry run), those the config plans (its `layers` x `sae.d_sae`)."""
    made = ctx.work.joinpath("sae").is_dir() and any(ctx.work.joinpath("sae").glob("layer_*/cfg.json"))
    if made:
        widths = {layer: _width(ctx, layer) for layer in sae_layers(ctx)}
    elif ctx.task_cfg.layers is not None:
        widths = {layer: ctx.task_cfg.sae.d_sae for layer in ctx.task_cfg.layers}
    else:
        raise DataSourceError(f"{TASK}/{ctx.target}: no SAE in {ctx.work / 'sae'}; run the groundtruth stage first "
                              "(or set tasks.feature_descriptions.layers to plan from the config)")
    return [LatentRange(layer, start, min(start + size, width)) for layer, width in widths.items()
            for start in range(0, width, size)]


@lru_cache(maxsize=1)
def _directions(folder: str, layer: int) -> np.ndarray:
    """The unit decoder directions [d_sae, d] of a saved SAE, kept for the next chunk of the same layer
    (one layer at a time: a 131k-latent SAE's are 2 GB)."""
    from .sae import decoder_directions, load_sae

    return decoder_directions(load_sae(folder, layer, device="cpu"))


def queries(ctx: StageContext, chunk: LatentRange, model=None, tokenizer=None) -> list[Record]:
    """One record per latent of the chunk: v its unit decoder direction, the layer; no label."""
    layer, start, end = chunk.layer, chunk.start, chunk.end
    directions = _directions(str(sae_dir(ctx, layer)), layer)[start:end]
    return [Record(record_id=safe_key(TASK, ctx.target, f"L{layer}", f"F{f}"), task=TASK, target=ctx.target,
                   split="explain", source_id=f"L{layer}-F{f}", prompt="", question="", explanation="", changed=False,
                   output_before="", output_after="", layers=[layer], vector=direction,
                   query={"layer": layer, "feature": f})
            for f, direction in zip(range(start, end), directions)]


def truth(ctx: StageContext, records: list[Record], model=None, tokenizer=None) -> list[Record]:
    """The describe step on the sampled latents: exemplars over the run's corpus, the best description;
    a latent firing in fewer than min_exemplars texts (or below min_simulation) gets none."""
    cfg = ctx.task_cfg
    describers, simulator, out = make_describers(cfg), simulator_of(cfg), []
    wanted = {(r.layers[0], r.query["feature"]) for r in records}
    for layer in sorted({layer for layer, _ in wanted}):
        merged = merged_exemplars(ctx, layer)
        sampled = {f: merged[f] for l, f in wanted if l == layer and f in merged}
        out += feature_records(sampled, _directions(str(sae_dir(ctx, layer)), layer), layer, ctx.target, cfg,
                               describers, simulator)
    return out


def with_source(cfg: FeatureConfig, source: str, layers: Optional[list[int]]) -> FeatureConfig:
    """The task config whose SAEs are `source` (a sae-lens folder or release, '{layer}' in it for several
    layers) at `layers` (default: the run's)."""
    return dataclasses.replace(cfg, layers=layers if layers else cfg.layers, sae=dataclasses.replace(cfg.sae, pretrained=source))


FEATURE_UNITS = ExplainUnits(chunks, queries, truth, needs_target=False, chunk_size=256, unit_name="latent",
                             feature_of=lambda query: (query["layer"], query["feature"]), with_source=with_source,
                             prepare=FEATURE_RECIPE.steps[:3])  # activations, the SAE, exemplars
