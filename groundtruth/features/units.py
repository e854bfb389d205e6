"""Explain units of feature descriptions (TaskSpec.explain_units): every latent of every SAE the run's
ground truth made or loaded, described or not, and the recipe's own describe step as the ground truth of
a validation sample (the latents' exemplars mined over the run's corpus, the best candidate description
by simulation).
"""
from __future__ import annotations

import json

from ..records import Record, safe_key
from ..stages import StageContext
from ..taskspec import ExplainUnits
from .recipe import merged_exemplars, sae_dir, sae_layers
from .task import TASK, feature_records, make_describers, simulator_of


def _width(ctx: StageContext, layer: int) -> int:
    """Latents of the layer's SAE, from its sae-lens config (no weights loaded)."""
    path = sae_dir(ctx, layer) / "cfg.json"
    if not path.is_file():
        from ..errors import DataSourceError

        raise DataSourceError(f"{TASK}/{ctx.target}: no SAE at {path.parent}; run the groundtruth stage first")
    return int(json.loads(path.read_text())["d_sae"])


def chunks(ctx: StageContext, size: int) -> list[tuple[int, int, int]]:
    """(layer, first latent, end) of every layer's SAE, `size` latents at a time."""
    return [(layer, start, min(start + size, _width(ctx, layer))) for layer in sae_layers(ctx)
            for start in range(0, _width(ctx, layer), size)]


def queries(ctx: StageContext, chunk: tuple[int, int, int], model=None, tokenizer=None) -> list[Record]:
    """One record per latent of the chunk: v its unit decoder direction, the layer; no label."""
    from .sae import decoder_directions, load_sae

    layer, start, end = chunk
    directions = decoder_directions(load_sae(str(sae_dir(ctx, layer)), layer, device="cpu"))[start:end]
    return [Record(record_id=safe_key(TASK, ctx.target, f"L{layer}", f"F{f}"), task=TASK, target=ctx.target,
                   split="explain", source_id=f"L{layer}-F{f}", prompt="", question="", explanation="", changed=False,
                   output_before="", output_after="", layers=[layer], vector=direction,
                   query={"layer": layer, "feature": f})
            for f, direction in zip(range(start, end), directions)]


def truth(ctx: StageContext, records: list[Record], model=None, tokenizer=None) -> list[Record]:
    """The describe step on the sampled latents: exemplars over the run's corpus, the best description;
    a latent firing in fewer than min_exemplars texts (or below min_simulation) gets none."""
    from .sae import decoder_directions, load_sae

    cfg = ctx.task_cfg
    describers, simulator, out = make_describers(cfg), simulator_of(cfg), []
    wanted = {(r.layers[0], r.query["feature"]) for r in records}
    for layer in sorted({layer for layer, _ in wanted}):
        merged = merged_exemplars(ctx, layer)
        sampled = {f: merged[f] for l, f in wanted if l == layer and f in merged}
        directions = decoder_directions(load_sae(str(sae_dir(ctx, layer)), layer, device="cpu"))
        out += feature_records(sampled, directions, layer, ctx.target, cfg, describers, simulator)
    return out


FEATURE_UNITS = ExplainUnits(chunks, queries, truth, needs_target=False, chunk_size=512, unit_name="latent",
                             feature_of=lambda query: (query["layer"], query["feature"]))
