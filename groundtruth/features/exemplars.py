"""Top-activating contexts per feature, mined shard by shard and merged (streaming top-k).

An exemplar is a window of tokens around the token where a feature fires most in one text, with the
feature's activation at every token of the window; one exemplar per text and feature. Each shard also
contributes windows of a few random texts as negatives (the simulator is scored on both, so a
description that fires everywhere scores low).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .activations import ActivationBatch


@dataclass
class Window:
    tokens: list[str]
    acts: list[float]  # the feature's activation at each token of the window
    origin: Optional[list[int]] = None  # [activation shard, token index] of a top exemplar's peak

    @property
    def peak(self) -> float:
        return max(self.acts) if self.acts else 0.0


@dataclass
class FeatureExemplars:
    """What the describers, simulators and the report see of one feature."""

    layer: int
    feature: int
    top: list[Window] = field(default_factory=list)  # strongest first
    negatives: list[Window] = field(default_factory=list)
    active_tokens: int = 0  # tokens where the feature fired
    tokens: int = 0  # tokens seen

    @property
    def frequency(self) -> float:
        return self.active_tokens / self.tokens if self.tokens else 0.0

    def windows(self) -> list[Window]:
        """Top exemplars then negatives: the tokens a simulation is scored on."""
        return self.top + self.negatives

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "FeatureExemplars":
        data = dict(data)
        data["top"] = [Window(**w) for w in data["top"]]
        data["negatives"] = [Window(**w) for w in data["negatives"]]
        return cls(**data)


@torch.no_grad()
def mine_exemplars(batch: ActivationBatch, layer: int, encode_rows: Callable[[torch.Tensor], torch.Tensor],
                   top_k: int, negatives: int, before: int = 12, after: int = 3, seed: int = 0, shard: int = 0,
                   chunk_tokens: int = 4096, device: str = "cpu") -> dict[int, FeatureExemplars]:
    """Per feature that fires in the batch: its top_k texts' windows (peaks centred, `before` tokens of
    context, `after` tokens after) and windows of `negatives` random texts.

    encode_rows maps activations [n, d_in] (on `device`) to feature activations [n, d_sae]. Streaming:
    codes exist for at most chunk_tokens tokens at a time (a 131,072-feature SAE's dense codes for a
    shard would be hundreds of GB); pass 1 keeps a running per-feature top_k of per-text maxima, pass 2
    encodes only the rows the chosen windows cover. Top windows remember where their peak is
    ([shard, token index]) so the raw activation there can be read back (the ACT set)."""
    text_of = batch.text_of
    if len(text_of) == 0:
        return {}
    _, starts = np.unique(text_of, return_index=True)  # text_of is grouped by text
    ends = np.append(starts[1:], len(text_of))
    acts = batch.acts[layer]  # [N, d_in], possibly memory-mapped

    def codes(rows) -> torch.Tensor:  # [n, d_sae] on device
        return encode_rows(torch.from_numpy(np.array(acts[rows], dtype=np.float32)).to(device))  # copied off a memmap

    active, best = _top_texts(codes, starts, ends, top_k, chunk_tokens)
    firing = torch.nonzero(active).flatten().tolist()  # features with a top window have fired
    values, text_index, peaks = (t.cpu().numpy() for t in best)  # [k, d_sae] each
    # pass 2: the activations of each firing feature over its top windows, rows encoded once each
    feature_of, rank = np.nonzero(values.T > 0)  # by feature, strongest first
    pairs = list(zip(feature_of.tolist(), text_index[rank, feature_of].tolist(), peaks[rank, feature_of].tolist()))
    spans = [(max(starts[i], p - before), min(ends[i], p + after + 1)) for _, i, p in pairs]
    window_acts = _feature_values(codes, [f for f, _, _ in pairs], spans, chunk_tokens)
    negative_texts = random.Random(seed).sample(range(len(starts)), min(negatives, len(starts)))
    negative_spans = [(starts[i], min(ends[i], starts[i] + before + after + 1)) for i in negative_texts]
    negative_rows = np.concatenate([np.arange(lo, hi) for lo, hi in negative_spans]) if negative_spans else np.zeros(0, int)
    negative_codes = codes(negative_rows).cpu().numpy() if len(negative_rows) else np.zeros((0, 0), np.float32)
    out = {f: FeatureExemplars(layer, f, active_tokens=int(active[f]), tokens=len(text_of)) for f in firing}
    for (f, _, peak), (lo, hi), feature_acts in zip(pairs, spans, window_acts):
        out[f].top.append(Window(batch.tokens[lo:hi], [round(float(a), 4) for a in feature_acts], [shard, peak]))
    for f in firing:
        offset = 0
        for lo, hi in negative_spans:
            column = negative_codes[offset:offset + hi - lo, f]
            out[f].negatives.append(Window(batch.tokens[lo:hi], [round(float(a), 4) for a in column]))
            offset += hi - lo
    return out


def _chunks(starts: np.ndarray, ends: np.ndarray, chunk_tokens: int) -> Iterator[tuple[int, int]]:
    """Runs of whole texts [i0, i1) of at most chunk_tokens tokens (a longer text is a run alone)."""
    i0 = 0
    while i0 < len(starts):
        i1 = i0 + 1
        while i1 < len(starts) and ends[i1] - starts[i0] <= chunk_tokens:
            i1 += 1
        yield i0, i1
        i0 = i1


def _top_texts(codes, starts: np.ndarray, ends: np.ndarray, top_k: int, chunk_tokens: int):
    """Pass 1: tokens each feature fires on [d_sae], and per feature the top_k per-text maxima with
    their text index and peak token ((values, texts, peaks), each [<=top_k, d_sae], strongest first)."""
    active = best = None
    for i0, i1 in _chunks(starts, ends, chunk_tokens):
        base = starts[i0]
        chunk = codes(slice(base, ends[i1 - 1]))  # [n, d_sae]
        fired = (chunk > 0).sum(0)
        active = fired if active is None else active + fired
        maxima = [chunk[starts[i] - base:ends[i] - base].max(0) for i in range(i0, i1)]
        values = torch.stack([m.values for m in maxima])  # [texts, d_sae]
        peaks = torch.stack([m.indices for m in maxima]) + torch.as_tensor(starts[i0:i1], device=chunk.device)[:, None]
        texts = torch.arange(i0, i1, device=chunk.device)[:, None].expand_as(values)
        if best is not None:
            values, texts, peaks = (torch.cat([b, c]) for b, c in zip(best, (values, texts, peaks)))
        top = values.topk(min(top_k, len(values)), dim=0)  # sorted, strongest first
        best = (top.values, texts.gather(0, top.indices), peaks.gather(0, top.indices))
    return active, best


def _feature_values(codes, features: list[int], spans: list[tuple[int, int]], chunk_tokens: int) -> list[np.ndarray]:
    """Pass 2: feature features[n]'s activations over the rows spans[n] = [lo, hi), each row encoded once."""
    if not spans:
        return []
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
    feats = np.concatenate([np.full(hi - lo, f) for f, (lo, hi) in zip(features, spans)])
    unique, where = np.unique(rows, return_inverse=True)  # where: position of each row in unique
    order = np.argsort(where, kind="stable")  # lookups grouped by the chunk their row falls in
    bounds = np.searchsorted(where[order], np.arange(0, len(unique) + chunk_tokens, chunk_tokens))
    flat = np.zeros(len(rows), np.float32)
    for n, c0 in enumerate(range(0, len(unique), chunk_tokens)):
        chunk = codes(unique[c0:c0 + chunk_tokens])  # [<=chunk_tokens, d_sae]
        mine = order[bounds[n]:bounds[n + 1]]
        local = torch.as_tensor(where[mine] - c0, device=chunk.device)
        flat[mine] = chunk[local, torch.as_tensor(feats[mine], device=chunk.device)].cpu().numpy()
    return np.split(flat, np.cumsum([hi - lo for lo, hi in spans])[:-1])


def merge_exemplars(parts: list[dict[int, FeatureExemplars]], top_k: int, negatives: int) -> dict[int, FeatureExemplars]:
    """Merge per-shard exemplars (in shard order): the top_k strongest windows over all shards, the
    first `negatives` negatives, summed counts. A merged result is itself a part: folding shards in one
    at a time gives the same result with one shard's exemplars in memory besides the merge."""
    merged: dict[int, FeatureExemplars] = {}
    total = 0  # tokens over all shards (a shard's features all saw its every token)
    for part in parts:
        total += next(iter(part.values())).tokens if part else 0
        for f, ex in part.items():
            into = merged.setdefault(f, FeatureExemplars(ex.layer, f))
            into.top = sorted(into.top + ex.top, key=lambda w: -w.peak)[:top_k]
            into.negatives = (into.negatives + ex.negatives)[:negatives]
            into.active_tokens += ex.active_tokens
    for ex in merged.values():
        ex.tokens = total
    return merged
