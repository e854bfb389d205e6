"""Task B, activation patching, as a ground-truth task: fact pairs in, one record per (block, position).

For each counterfactual pair (x, x') every position t of x is patched in every block with the block
mean of x' at the aligned position t' (see groundtruth/patching.py); the record holds v, the block's
layers, the token and its type, and the target's greedy next token before and after.

Position alignment (x and x' differ only in the subject): tokens before the subject align by index
from the start; subject tokens by distance from the subject's last token (clipped at the counterfactual
subject's first); tokens after the subject by distance from the end of the prompt. The pairs, their
prompts and token types are groundtruth/fact_pairs.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Optional

import torch

from .attribution_patching import ATP_PASSES, ScreenConfig, block_estimates, mark_screened, patched_share, sites_to_patch
from .dataset import MARGIN
from .explanations import format_explanation
from .fact_pairs import (FactPairConfig, PatchItem, PatchPrompt, build_items, encode_pair, items_of_inputs,
                         whole_answer, with_counterfact_file)
from .patching import (CLEAN_ROWS, Decision, Intervention, PairPatches, block_vector, clean_runs, decoder_layers, layer_blocks,
                       pair_clean_runs, patch_pairs)
from .records import Record, safe_key
from .taskspec import TaskSpec, TaskWork
from .units import per_item_units

TASK = "activation_patching"


@dataclass
class PatchingConfig(FactPairConfig):
    """Ground truth for activation patching."""

    unset_keeps_hash: ClassVar[tuple[str, ...]] = ("screen",)
    num_blocks: int = 4
    """Contiguous blocks the target's layers are cut into (the paper: 4)."""
    positions: Literal["all", "text"] = "all"
    """Positions searched: every token of the target's input, or only the tokens of the prompt text
    (and the last position), skipping a few-shot preamble or chat-template tokens around it."""
    screen: Optional[ScreenConfig] = None
    """Attribution patching as a screen: exact patching only on a pair's (block, position) sites with the
    largest AtP estimates and an audit sample of the rest (label_stats.json: the recall of changed labels
    it implies); null: every site."""

    def check(self) -> None:
        super().check()
        if self.screen is not None:
            self.screen.check()
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be at least 1, got {self.num_blocks}")

    def label_settings(self) -> str:
        return ("prompt_format, target_format, system_prompt, positions, or the target model's "
                "chat_template_kwargs (Qwen3: {enable_thinking: false})")


def align(t: int, x: PatchPrompt, x_prime: PatchPrompt) -> int:
    """The position of x' aligned with position t of x (the rule in the module docstring)."""
    (s0, s1), (p0, p1) = x.subject, x_prime.subject
    if t < s0:
        return min(t, p0 - 1) if p0 > 0 else 0
    if t <= s1:
        return max(p0, p1 - (s1 - t))
    return max(p1 + 1, len(x_prime.ids) - (len(x.ids) - t))


def run_patching(model, tokenizer, items: list[PatchItem], cfg: PatchingConfig, target: str,
                 split_of: Callable[[str], str], batch_size: int = 16) -> list[Record]:
    """Every (block, position) of every pair: patched with the fast patcher, one record each, with the
    smaller logit margin of its two decisions (before, after) in query[MARGIN]. Records in item order.

    batch_size is unused: a pair's interventions of one block always make one batch, and pairs of one
    length share their clean runs' forwards (patching.pair_clean_runs)."""
    blocks = layer_blocks(len(decoder_layers(model)), cfg.num_blocks)
    sides = [encode_pair(tokenizer, cfg, it) for it in items]
    records_of: dict[int, list[Record]] = {}
    for group in pair_clean_runs(model, [(x.ids, xp.ids) for x, xp in sides]):
        plans, marks = [], []
        for i, clean, source in group:
            interventions = pair_interventions(sides[i], len(blocks), cfg)
            kept = sites_to_patch(len(interventions), cfg.screen, lambda: block_estimates(
                model, sides[i][0].ids, clean.states, source.states, blocks, interventions, cfg.screen.qk_fix),
                items[i].pair.pair_id)
            plans.append(PairPatches(sides[i][0].ids, [interventions[k] for k, _ in kept], clean, source))
            marks.append(kept)
        for (i, *_), plan, patched, kept in zip(group, plans, patch_pairs(model, plans, blocks), marks):
            records_of[i] = _pair_records(tokenizer, items[i], *sides[i], plan, patched, blocks, target, split_of)
            mark_screened(records_of[i], kept)
    return [r for i in range(len(items)) for r in records_of[i]]


def pair_interventions(sides: tuple[PatchPrompt, PatchPrompt], num_blocks: int, cfg: PatchingConfig) -> list[Intervention]:
    """Every (block, position) patched in a pair: all positions of x, or its text's (cfg.positions)."""
    x, xp = sides
    positions = range(len(x.ids)) if cfg.positions == "all" else x.text_positions
    return [Intervention(b, t, align(t, x, xp)) for b in range(num_blocks) for t in positions]


def _pair_records(tokenizer, item: PatchItem, x: PatchPrompt, xp: PatchPrompt, plan: PairPatches,
                  patched: list[Decision], blocks: list[list[int]], target: str,
                  split_of: Callable[[str], str]) -> list[Record]:
    """One pair's records from its patched decisions."""
    before = whole_answer(tokenizer, plan.clean.decision.token, item.pair.options)
    records = pair_queries(tokenizer, item, x, xp, plan.interventions, plan.source.states, blocks, target, split_of)
    for record, decision in zip(records, patched):
        after = whole_answer(tokenizer, decision.token, item.pair.options)
        record.changed = after != before
        record.explanation = format_explanation(record.changed, after)
        record.output_before, record.output_after = before, after
        record.query[MARGIN] = round(min(plan.clean.decision.margin, decision.margin), 4)
    return records


def pair_queries(tokenizer, item: PatchItem, x: PatchPrompt, xp: PatchPrompt, interventions: list[Intervention],
                 source_states: torch.Tensor, blocks: list[list[int]], target: str,
                 split_of: Callable[[str], str]) -> list[Record]:
    """One record per intervention of a pair, as the explainer is asked about it (v, the block's layers,
    the token), its label not yet known (unchanged, no outputs)."""
    pair = item.pair
    # every v of the pair in one copy to the host: [len(interventions), d] fp32
    vectors = torch.stack([block_vector(source_states, blocks[iv.block], iv.source_position)
                           for iv in interventions]).cpu().numpy()
    records = []
    for iv, vector in zip(interventions, vectors):
        token_text = tokenizer.decode([int(x.ids[iv.position])])
        records.append(Record(
            record_id=safe_key(target, TASK, pair.pair_id, f"b{iv.block}", f"t{iv.position}"), task=TASK,
            target=target, split=split_of(item.source_id), source_id=item.source_id, prompt=x.text,
            question="How would the output change?", explanation="", changed=False, output_before="",
            output_after="",
            query={"token": token_text, "position": iv.position, "source_position": iv.source_position,
                   "token_type": x.token_types[iv.position], "block": str(iv.block),
                   "relation": pair.x.relation, "subject": pair.x.subject,
                   "counterfactual_subject": pair.x_prime.subject, "counterfactual_prompt": xp.text,
                   "options": list(pair.options)},
            layers=list(blocks[iv.block]), token_type=x.token_types[iv.position],
            vector=vector,
        ))
    return records


def explain_queries(model, tokenizer, items: list[PatchItem], cfg: PatchingConfig, target: str,
                    split_of: Callable[[str], str]) -> list[Record]:
    """Every (block, position) of every pair as an unlabelled record: v needs only x''s clean run (one
    forward per pair, where labelling it patches every intervention)."""
    blocks = layer_blocks(len(decoder_layers(model)), cfg.num_blocks)
    sides = [encode_pair(tokenizer, cfg, it) for it in items]
    records = []
    for start in range(0, len(items), CLEAN_ROWS):  # x' of several pairs in one right-padded forward
        group = range(start, min(start + CLEAN_ROWS, len(items)))
        for i, source in zip(group, clean_runs(model, [sides[i][1].ids for i in group])):
            records += pair_queries(tokenizer, items[i], *sides[i], pair_interventions(sides[i], len(blocks), cfg),
                                    source.states, blocks, target, split_of)
    return records


def same_item(record: Record) -> str:
    """(pair, block, token): the block is the same share of depth in any model; the token is named by its
    type and text, as positions differ between tokenizers."""
    q = record.query
    return f"{record.source_id}|{q['counterfactual_subject']}|b{q['block']}|{record.token_type}|{q['token'].strip()}"


def balance_cell(record: Record) -> str:
    """The (token type, block) cell a record counts in when balancing."""
    return f"{record.token_type}/block{record.query.get('block')}"



SPEC = TaskSpec(
    TASK, PatchingConfig, "if this activation were patched in, how would the output change?", "causal",
    # the paper's inputs for task B: v as the soft token, the block's layers, the patched token, the text
    templates=(
        "At layers {layers}, the hidden state of token {position} ({token!r}) of the input below is replaced "
        "by {vec}.\nInput: {prompt}\nHow would the output change?",
        "Input: {prompt}\nIf {vec} were patched into {token!r} (token {position}) at layers {layers}, how would "
        "the model's next word change?",
        "{vec} is written over the residual stream of {token!r}, position {position}, in layers {layers} "
        "while the model reads: {prompt}\nWhat does the model output now?",
    ), explanation_tokens=50,
    # CounterFact prompt + forced-choice suffix ~40 tokens; the clean runs of x and x', then one forward per
    # (position, block), or with a screen AtP's forward and backward and the share of sites it patches
    work=TaskWork(target_tokens=40, explainer_tokens=120, paper_items=21_919,
                  passes=lambda cfg: 2 + (cfg.screen is not None) * ATP_PASSES
                  + round(40 * cfg.num_blocks * patched_share(cfg.screen))),
    build_items=build_items, run=run_patching, has_vectors=True, balance_cell=balance_cell, same_item=same_item,
    identity_fields=("subject", "counterfactual_subject", "counterfactual_prompt"),
    explain_units=per_item_units(build_items, run_patching, explain_queries, needs_target=True, unit_name="pair",
                                 units_per_item=lambda cfg: 20 * cfg.num_blocks,  # ~20 text tokens a prompt
                                 items_of_inputs=items_of_inputs, with_source=with_counterfact_file))
