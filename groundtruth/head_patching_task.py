"""Attention-head patching as a ground-truth task: fact pairs in, one record per (layer, head) of a pair.

For each counterfactual pair (x, x'), every query head's output at the last position of x is replaced by
its output on x' (groundtruth/head_patching.py: why the last position); the record holds v (that head's
contribution to the residual stream on x'), its layer and head, the target's greedy next token before and
after, and the continuous effect beside the label: how far the patch moved the logit difference of the
two answers' first tokens (x''s minus x's) toward x''s answer. The pairs, their prompts and options are
groundtruth/fact_pairs.py's, as for activation patching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .attribution_patching import ATP_PASSES, ScreenConfig, head_estimates, mark_screened, patched_share, sites_to_patch
from .dataset import MARGIN
from .explanations import format_explanation
from .fact_pairs import (FactPairConfig, PatchItem, PatchPrompt, build_items, encode_pair, items_of_inputs,
                         whole_answer, with_counterfact_file)
from .head_patching import (Head, HeadPatches, HeadRun, answer_token, every_head, head_run, head_shape, head_vector,
                            patch_heads)
from .records import Record, safe_key
from .taskspec import TaskSpec, TaskWork, split_records
from .units import per_item_units

TASK = "head_patching"
EFFECT = "effect"
"""Query field: the patch's change of the answers' logit difference (positive: toward x''s answer)."""
DEPTHS = 4
"""Depth quarters of the target's layers: the cells balancing spreads records over, and what a head's
place in the model is called in any model (heads themselves do not correspond across models)."""


@dataclass
class HeadPatchingConfig(FactPairConfig):
    """Ground truth for attention-head patching."""

    layers: Optional[list[int]] = None
    """Layers whose heads are patched (negative: from the last); null: every layer."""
    screen: Optional[ScreenConfig] = None
    """Attribution patching as a screen: exact patching only on a pair's heads with the largest AtP
    estimates and an audit sample of the rest (label_stats.json: the recall of changed labels it
    implies); null: every head."""

    def check(self) -> None:
        super().check()
        if self.screen is not None:
            self.screen.check()


def run_head_patching(model, tokenizer, items: list[PatchItem], cfg: HeadPatchingConfig, target: str,
                      split_of: Callable[[str], str], batch_size: int = 16) -> list[Record]:
    """Every configured head of every pair, patched at the last position (one batch of one-token rows per
    pair), one record each with the smaller logit margin of its two decisions in query[MARGIN].

    batch_size is unused: a pair's heads always make up to HEAD_ROWS rows of one forward."""
    every, records = every_head(model, cfg.layers), []
    for item in items:
        x, xp = encode_pair(tokenizer, cfg, item)
        answers = (answer_token(tokenizer, item.pair.x.answer), answer_token(tokenizer, item.pair.x_prime.answer))
        clean, source = head_run(model, x.ids), head_run(model, xp.ids)
        kept = sites_to_patch(len(every), cfg.screen, lambda: head_estimates(
            model, x.ids, clean.outputs, source.outputs, every), item.pair.pair_id)
        heads = [every[k] for k, _ in kept]
        result = patch_heads(model, x.ids, xp.ids, heads, answers, clean, source)
        mine = _labelled(tokenizer, item, x, xp, heads, source, result, model, target, split_of)
        mark_screened(mine, kept)
        records += mine
    return records


def _labelled(tokenizer, item: PatchItem, x: PatchPrompt, xp: PatchPrompt, heads: list[Head], source: HeadRun,
              result: HeadPatches, model, target: str, split_of: Callable[[str], str]) -> list[Record]:
    before = whole_answer(tokenizer, result.clean.token, item.pair.options)
    records = head_queries(tokenizer, item, x, xp, heads, source, model, target, split_of)
    for record, decision, effect in zip(records, result.patched, result.effects):
        after = whole_answer(tokenizer, decision.token, item.pair.options)
        record.changed = after != before
        record.explanation = format_explanation(record.changed, after)
        record.output_before, record.output_after = before, after
        record.query[MARGIN] = round(min(result.clean.margin, decision.margin), 4)
        record.query[EFFECT] = round(effect, 4)
    return records


def head_queries(tokenizer, item: PatchItem, x: PatchPrompt, xp: PatchPrompt, heads: list[Head], source: HeadRun,
                 model, target: str, split_of: Callable[[str], str]) -> list[Record]:
    """One record per head of a pair, as the explainer is asked about it (v, layer, head, the last token),
    its label not yet known."""
    pair, num_layers, last = item.pair, head_shape(model)[0], len(x.ids) - 1
    # every v of the pair in one copy to the host: [len(heads), d] fp32
    vectors = torch.stack([head_vector(model, h, source.outputs[h.layer, h.head]) for h in heads]).cpu().numpy()
    token = tokenizer.decode([int(x.ids[last])])
    return [Record(
        record_id=safe_key(target, TASK, pair.pair_id, f"l{h.layer}", f"h{h.head}"), task=TASK, target=target,
        split=split_of(item.source_id), source_id=item.source_id, prompt=x.text,
        question="How would the output change?", explanation="", changed=False, output_before="", output_after="",
        query={"head": h.head, "layer": h.layer, "depth": str(DEPTHS * h.layer // num_layers), "token": token,
               "position": last, "relation": pair.x.relation, "subject": pair.x.subject,
               "counterfactual_subject": pair.x_prime.subject, "counterfactual_prompt": xp.text,
               "options": list(pair.options)},
        layers=[h.layer], token_type=x.token_types[last], vector=vector)
        for h, vector in zip(heads, vectors)]


def explain_queries(model, tokenizer, items: list[PatchItem], cfg: HeadPatchingConfig, target: str,
                    split_of: Callable[[str], str]) -> list[Record]:
    """Every configured head of every pair as an unlabelled record: v needs only x''s clean run."""
    heads, records = every_head(model, cfg.layers), []
    for item in items:
        x, xp = encode_pair(tokenizer, cfg, item)
        records += head_queries(tokenizer, item, x, xp, heads, head_run(model, xp.ids), model, target, split_of)
    return records


def balance_cell(record: Record) -> str:
    """The depth quarter of the record's head."""
    return f"depth{record.query.get('depth')}"


SPEC = TaskSpec(
    TASK, HeadPatchingConfig, "if this attention head read the counterfactual input, how would the output change?",
    "causal",
    templates=(
        "Attention head {query[head]} of layer {layers} writes {vec} at the last token ({token!r}) of the input "
        "below, as it does when reading another input.\nInput: {prompt}\nHow would the output change?",
        "Input: {prompt}\nIf head {query[head]} in layer {layers} wrote {vec} at the last token instead of its own "
        "output, how would the model's next word change?",
        "While the model reads: {prompt}\nthe output of attention head {query[head]}, layer {layers}, at the last "
        "token is replaced by {vec}. What does the model output now?",
    ), explanation_tokens=50,
    # the clean runs of x and x', then one row of one token per head: an 8B Llama's 32 x 32 heads are about
    # 26 forwards of a 40-token prompt (with a screen: AtP's forward and backward, and the heads it patches)
    # a balanced pair keeps its changed heads and as many unchanged: about 1% of heads flip the answer on
    # the offline models (SmolLM2 0.8%, Gemma 4.5%), 10 of an 8B model's 1,024
    work=TaskWork(target_tokens=40, explainer_tokens=120, paper_items=21_919, passes=lambda cfg: 2 + (cfg.screen is not None) * ATP_PASSES
                  + round(26 * patched_share(cfg.screen)),
                  records=lambda cfg, items: split_records(cfg, 20 * items)),
    build_items=build_items, run=run_head_patching, has_vectors=True, balance_cell=balance_cell,
    identity_fields=("subject", "counterfactual_subject", "counterfactual_prompt"),
    explain_units=per_item_units(build_items, run_head_patching, explain_queries, needs_target=True, unit_name="pair",
                                 units_per_item=lambda cfg: 1024,  # an 8B Llama's heads
                                 items_of_inputs=items_of_inputs, with_source=with_counterfact_file))
