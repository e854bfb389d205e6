"""Attribution patching (AtP): a linear estimate of every patch's effect from one forward and one backward.

The metric is the log-probability of the target's clean greedy token at the last position of x. A zero
perturbation is added at every site (each decoder layer's output at every position; each head's slice of
o_proj's input at the last position) and the metric differentiated with respect to it: the estimate of a
patch is the change it makes at its sites dotted with that gradient, for every block-position and every
head at once (Nanda 2023; Kramar et al. 2024, "AtP*"). A block patch writes v over the residual stream
after each of the block's layers, so its estimate sums those layers' terms; a head patch's term is exact
up to what the layers after it do, since o_proj is linear.

Used as a screen (`screened`): exact patching runs only on the sites with the largest |estimate| and on a
uniform random audit sample of the rest, from which the recall of changed labels is estimated
(`screen_recall`). For (block, position) sites AtP*'s QK fix is an option (`ScreenConfig.qk_fix`,
groundtruth/qk_fix.py); GradDrop is not implemented: the audit sample measures what that costs in recall.
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .head_patching import Head, attention_output, head_shape
from .models import model_device
from .patching import Intervention, block_vector, decoder_layers
from .qk_fix import LayerAttention, qk_corrections, recorded_attention


@dataclass
class ScreenConfig:
    """Exact patching on the top `top_fraction` of a pair's sites by |AtP estimate| and on a uniform sample
    of `audit_fraction` of the others, which estimates how many changed labels the screen missed."""

    top_fraction: float = 0.2
    audit_fraction: float = 0.05
    qk_fix: bool = False
    """(block, position) sites: AtP*'s QK fix, exact attention probabilities in the layer after each of the
    block's layers (groundtruth/qk_fix.py; about 0.4 of a forward more per pair). Head sites stay linear."""

    def check(self) -> None:
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"screen.top_fraction: must be in (0, 1], got {self.top_fraction}")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"screen.audit_fraction: must be in [0, 1], got {self.audit_fraction}")


ATP_PASSES = 3
"""Forward-pass equivalents of one AtP estimate of a pair: a forward and a backward (about two)."""


def patched_share(cfg: Optional[ScreenConfig]) -> float:
    """The share of a pair's sites a screen patches exactly (its top and its audit of the rest); 1 without."""
    return 1.0 if cfg is None else cfg.top_fraction + cfg.audit_fraction * (1 - cfg.top_fraction)


def _gradients(model, ids: torch.Tensor, modules: list, pre: bool,
               attention: Optional[list[LayerAttention]] = None) -> list[torch.Tensor]:
    """d log p(the clean greedy token at the last position) / d each module's output, or with `pre` its
    input, [T, width] fp32: one forward with a zero perturbation added at each, one backward. With
    `attention`, each decoder layer's attention is recorded there, with its gradients (groundtruth/qk_fix.py)."""
    deltas: list[torch.Tensor] = []

    def perturb(module, args, output=None):
        hidden = args[0] if pre else (output[0] if isinstance(output, tuple) else output)
        delta = torch.zeros_like(hidden, requires_grad=True)
        deltas.append(delta)
        moved = hidden + delta
        if pre:
            return (moved, *args[1:])
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    hooks = [m.register_forward_pre_hook(perturb) if pre else m.register_forward_hook(perturb) for m in modules]
    try:
        recording = recorded_attention(decoder_layers(model), attention) if attention is not None else nullcontext()
        with torch.enable_grad(), recording:
            logits = model(input_ids=ids[None].to(model_device(model)), logits_to_keep=1).logits[0, -1].float()
            logits.log_softmax(-1)[int(logits.argmax())].backward()
    finally:
        for hook in hooks:
            hook.remove()
    return [d.grad[0].float() for d in deltas]


def block_estimates(model, x: torch.Tensor, clean_states: torch.Tensor, source_states: torch.Tensor,
                    blocks: list[list[int]], interventions: list[Intervention], qk_fix: bool = False) -> list[float]:
    """AtP's estimate of each intervention's change of log p(clean token): sum over the block's layers of
    (v - the clean state after the layer at the position) . gradient there. States: [L + 1, T, d]. With
    `qk_fix`, AtP*'s: the layer after each of the block's layers takes its attention probabilities exactly
    (groundtruth/qk_fix.py)."""
    layers = decoder_layers(model)
    attention: Optional[list[LayerAttention]] = [] if qk_fix else None
    grads = _gradients(model, x, list(layers), pre=False, attention=attention)  # grads[l]: after layer l
    out, fixed = [], {}
    for i, iv in enumerate(interventions):
        v = block_vector(source_states, blocks[iv.block], iv.source_position)  # [d]
        out.append(sum(float((v - clean_states[l + 1, iv.position].float()) @ grads[l][iv.position].to(v.device))
                       for l in blocks[iv.block]))
        for l in blocks[iv.block]:
            if l + 1 < len(layers):  # layer l + 1 reads v at the position
                fixed.setdefault(l + 1, []).append((i, iv.position, v))
    if attention is None:
        return out
    return [e + c for e, c in zip(out, qk_corrections(layers, attention, fixed, len(out)))]


def head_estimates(model, x: torch.Tensor, clean_outputs: torch.Tensor, source_outputs: torch.Tensor,
                   heads: list[Head]) -> list[float]:
    """AtP's estimate of each head patch's change of log p(clean token): (the head's output on x' minus
    on x, at the last position) . gradient there. Outputs: [L, H, D]."""
    layers, num_heads, dim = head_shape(model)
    grads = _gradients(model, x, [attention_output(model, layer) for layer in range(layers)], pre=True)
    last = [g[-1].view(num_heads, dim) for g in grads]  # [H, D] per layer
    return [float((source_outputs[h.layer, h.head] - clean_outputs[h.layer, h.head]).float()
                  @ last[h.layer][h.head].to(source_outputs.device)) for h in heads]


def screened(estimates: list[float], cfg: ScreenConfig, seed: str) -> dict[int, str]:
    """Site index -> "top" (among the largest |estimate|, at least one) or "audit" (a seeded uniform sample of
    the rest); sites not named are not patched."""
    order = sorted(range(len(estimates)), key=lambda i: -abs(estimates[i]))
    top = max(1, math.ceil(cfg.top_fraction * len(estimates)))
    rest = order[top:]
    audit = random.Random(seed).sample(rest, round(cfg.audit_fraction * len(rest))) if rest else []
    return {**{i: "top" for i in order[:top]}, **{i: "audit" for i in audit}}


def screen(estimates: list[float], cfg: ScreenConfig, group: str) -> list[tuple[int, dict]]:
    """The sites of one pair (`group`) to patch, in order, each with what its record keeps in
    query["screen"]: why it was kept, its group, how many of the group's sites the top left, its estimate."""
    picked = screened(estimates, cfg, group)
    rest = len(estimates) - sum(why == "top" for why in picked.values())
    return [(i, {"kept": picked[i], "group": group, "rest": rest, "estimate": round(estimates[i], 4)})
            for i in sorted(picked)]


def sites_to_patch(count: int, cfg: Optional[ScreenConfig], estimates: Callable[[], list[float]],
                   group: str) -> list[tuple[int, Optional[dict]]]:
    """(site index, its query["screen"] mark) of a pair's sites to patch exactly: without a screen all
    `count` of them, unmarked; with one the screen's (`estimates` is called only then)."""
    if cfg is None:
        return [(k, None) for k in range(count)]
    return screen(estimates(), cfg, group)


def mark_screened(records: list, kept: list[tuple[int, Optional[dict]]]) -> None:
    """Each record of a kept site notes why the screen kept it (records without a mark stay as they are)."""
    for record, (_, mark) in zip(records, kept):
        if mark is not None:
            record.query["screen"] = mark


def screen_stats(records: list) -> Optional[dict]:
    """label_stats' `screen` section of records a screen kept: the recall of changed labels (screen_recall)
    and the share of sites patched exactly; None for records no screen chose."""
    marks = [(r.query["screen"], r.changed) for r in records if isinstance(r.query.get("screen"), dict)]
    if not marks:
        return None
    rests = {mark["group"]: mark["rest"] for mark, _ in marks}
    top = [changed for mark, changed in marks if mark["kept"] == "top"]
    audit = [changed for mark, changed in marks if mark["kept"] == "audit"]
    sites = len(top) + sum(rests.values())
    return {**(screen_recall(sum(top), sum(audit), len(audit), sum(rests.values())) or {}),
            "patched_fraction": round(len(marks) / sites, 4), "sites": sites}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion successes / n (n > 0): unlike the normal one it stays
    inside [0, 1] and is not empty at 0 or n successes."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n ** 2)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def screen_recall(found: int, audit_changed: int, audited: int, unscreened: int) -> Optional[dict]:
    """Recall of changed labels: those the top sites found over those plus the changed the rest is estimated
    to hold (the audit's changed rate times the unscreened sites), with a 95% interval from the audit's
    Wilson interval; None without an audit."""
    if audited == 0:
        return None

    def recall(rate: float) -> float:
        missed = rate * unscreened
        return found / (found + missed) if found + missed else 1.0

    lo, hi = wilson_interval(audit_changed, audited)
    return {"recall": round(recall(audit_changed / audited), 4), "recall_lo": round(recall(hi), 4),
            "recall_hi": round(recall(lo), 4), "found": found, "audit_changed": audit_changed,
            "audited": audited, "unscreened": unscreened}
