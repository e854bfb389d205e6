"""Out-of-distribution test sets for feature descriptions: the explainer, trained on SAE decoder
directions, reads other vectors that should carry the same feature.

- ACT: the raw residual activation at the peak token of a held-out feature's strongest exemplar.
- dACT: the difference of the residual stream at the last token between two prompts: the exemplar's
  text up to its peak token, and the same text with the peak token swapped for a token where the
  feature is silent (from one of its negative windows). The difference isolates what the peak token
  adds, which is where the feature fired.

The gold label is the held-out feature's description. Both vectors are scaled to unit norm, the norm
of the decoder directions the explainer was trained on (raw activations are 100-1000x longer); the
direction is what is tested.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..records import Record
from .exemplars import FeatureExemplars


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-8)).astype(np.float32)


def _relabel(record: Record, split: str, vector: np.ndarray, extra: dict) -> Record:
    query = {**record.query, **extra, "ood": split}
    return dataclasses.replace(record, record_id=f"{record.record_id}-{split}", split=split, vector=_unit(vector),
                               query=query)


def act_records(test: list[Record], activation_at) -> list[Record]:
    """ACT: activation_at(shard, token index, layer) -> the raw residual vector [d] there."""
    out = []
    for r in test:
        ex = FeatureExemplars.from_json(r.query["exemplars"])
        peak = ex.top[0]
        if peak.origin is None:
            continue
        shard, index = peak.origin
        out.append(_relabel(r, "act", activation_at(shard, index, r.layers[0]), {"peak_token": peak.tokens[peak.acts.index(peak.peak)]}))
    return out


def dact_pair(ex: FeatureExemplars) -> Optional[tuple[str, str]]:
    """(prompt ending at the peak token, the same prompt with a silent token in its place), or None."""
    window = ex.top[0]
    at = window.acts.index(window.peak)
    silent = next((t for w in ex.negatives for t, a in zip(w.tokens, w.acts) if a == 0 and t.strip()
                   and t.strip() != window.tokens[at].strip()), None)
    if silent is None or not "".join(window.tokens[:at]).strip():
        return None
    prefix = "".join(window.tokens[:at])
    return prefix + window.tokens[at], prefix + silent


def dact_records(test: list[Record], last_token_states) -> list[Record]:
    """dACT: last_token_states(texts, layer) -> [n, d] residual states at each text's last token."""
    pairs = []
    for r in test:
        pair = dact_pair(FeatureExemplars.from_json(r.query["exemplars"]))
        if pair is not None:
            pairs.append((r, pair))
    out = []
    for layer in sorted({r.layers[0] for r, _ in pairs}):
        chosen = [(r, p) for r, p in pairs if r.layers[0] == layer]
        states = last_token_states([t for _, p in chosen for t in p], layer)  # [2n, d]
        for i, (r, (x, x_swapped)) in enumerate(chosen):
            out.append(_relabel(r, "dact", states[2 * i] - states[2 * i + 1], {"dact_prompts": [x, x_swapped]}))
    return out
