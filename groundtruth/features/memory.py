"""Memory per step of the feature recipe on one target, for the dry run's scale plan (TaskWork.memory):
GPU bytes per actor or task, host bytes per process, and disk."""
from __future__ import annotations

from ..taskspec import MemoryPlan
from .sae import METRIC_TOKENS

WINDOW_TOKENS = 16  # an exemplar window: 12 tokens before the peak, the peak, 3 after
PY_VALUE_BYTES = 40  # one window value held in Python: a float object, its list slot, its token's slot


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def feature_memory(cfg, shape, dtype_bytes: int, batch_size: int) -> MemoryPlan:
    """cfg: the FeatureConfig; shape: the target's layers, hidden and params; dtype_bytes: its weights'."""
    n_layers = len(cfg.layers if cfg.layers is not None else cfg.depths)
    d, d_sae = shape.hidden, cfg.sae.d_sae
    tokens_per_shard = cfg.texts_per_shard * cfg.max_tokens
    shards = -(-cfg.corpus_texts // cfg.texts_per_shard)
    batch_tokens = batch_size * cfg.max_tokens
    sae_bytes = (2 * d * d_sae + d_sae + d) * 4
    codes_chunk = 3 * cfg.mine_chunk_tokens * d_sae * 4  # the codes and the encoder's temporaries
    windows = d_sae * (cfg.top_k + cfg.negatives) * WINDOW_TOKENS * PY_VALUE_BYTES  # one layer, all features
    if cfg.sae.pretrained:
        sae_gpu, sae_host = sae_bytes + codes_chunk + METRIC_TOKENS * d * 4, METRIC_TOKENS * d * 4
    else:  # trained here: every corpus token of the layer, on the host and on the device, plus Adam
        corpus = cfg.corpus_texts * cfg.max_tokens * d * 4
        sae_gpu, sae_host = 4 * sae_bytes + corpus, corpus
    steps = [
        ("activations (per actor)", shape.params * dtype_bytes + batch_tokens * (shape.layers + 1) * d * dtype_bytes,
         batch_tokens * n_layers * d * 4),
        ("SAE (per layer task)", sae_gpu, sae_host),
        ("exemplars (per shard task)", sae_bytes + codes_chunk, tokens_per_shard * 60 + codes_chunk / 3 + windows),
        ("describe (driver, one layer at a time)", 0, 2 * windows),
    ]
    disk = tokens_per_shard * n_layers * d * 4
    return MemoryPlan(summary=f"{n_layers} layers, d={d}, d_sae={d_sae}", steps=steps,
                      disk=f"activation shards {_gb(disk)} each, {_gb(disk * shards)} for {shards} shards (fp32, per layer)")
