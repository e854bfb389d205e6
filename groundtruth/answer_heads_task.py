"""Which attention heads carry the answer: head patching's list question, a task of its own.

For a counterfactual pair (x, x'), every query head of the configured layers is patched at the last
position of x with its output on x' (groundtruth/head_patching.py, as the head_patching task does), and
the heads are ranked by the continuous effect: how far each patch moves the logit difference of the two
answers' first tokens toward x''s answer. The record is the pair; its explanation names the top_k heads
("The answer is carried by <<<23.4, 20.1, 12.2>>>.", layer.head, strongest first), scored as a list
(eval: top-1, precision@k, recall@k; baseline head_prior, the heads most often at the top in training).
The explainer reads no vector: it is asked about the prompt pair, and answers from what it learnt of the
target's heads. `changed` records whether patching the top head alone changes the answer; it is no class
here (SplitConfig.two_classes), so nothing is balanced on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

from .explanations import format_list
from .fact_pairs import (FactPairConfig, PatchItem, build_items, encode_pair, items_of_inputs, whole_answer,
                         with_counterfact_file)
from .head_patching import Head, answer_token, every_head, head_run, patch_heads
from .records import Record, safe_key
from .taskspec import TaskSpec, TaskWork, split_records
from .units import per_item_units

TASK = "answer_heads"


@dataclass
class AnswerHeadsConfig(FactPairConfig):
    """Ground truth for the heads list question."""

    two_classes: ClassVar[bool] = False

    layers: Optional[list[int]] = None
    """Layers whose heads are ranked (negative: from the last); null: every layer."""
    top_k: int = 3
    """Heads named per pair, strongest first."""

    def check(self) -> None:
        super().check()
        if self.top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {self.top_k}")


def head_name(head: Head) -> str:
    return f"{head.layer}.{head.head}"


def run_answer_heads(model, tokenizer, items: list[PatchItem], cfg: AnswerHeadsConfig, target: str,
                     split_of: Callable[[str], str], batch_size: int = 16) -> list[Record]:
    """One record per pair: its top_k heads by effect (one batch of one-token rows per pair, as head
    patching runs it). batch_size is unused: a pair's heads make up rows of one forward."""
    heads, records = every_head(model, cfg.layers), []
    for record, item in zip(explain_queries(model, tokenizer, items, cfg, target, split_of), items):
        x, xp = encode_pair(tokenizer, cfg, item)
        answers = (answer_token(tokenizer, item.pair.x.answer), answer_token(tokenizer, item.pair.x_prime.answer))
        result = patch_heads(model, x.ids, xp.ids, heads, answers, head_run(model, x.ids), head_run(model, xp.ids))
        order = sorted(range(len(heads)), key=lambda k: -result.effects[k])[:cfg.top_k]
        before = whole_answer(tokenizer, result.clean.token, item.pair.options)
        after = whole_answer(tokenizer, result.patched[order[0]].token, item.pair.options)
        record.explanation = format_list([head_name(heads[k]) for k in order])
        record.changed, record.output_before, record.output_after = after != before, before, after
        record.query["effects"] = [round(result.effects[k], 4) for k in order]
        records.append(record)
    return records


def explain_queries(model, tokenizer, items: list[PatchItem], cfg: AnswerHeadsConfig, target: str,
                    split_of: Callable[[str], str]) -> list[Record]:
    """One record per pair as the explainer is asked about it (both prompts), its heads not yet known."""
    return [Record(
        record_id=safe_key(target, TASK, item.pair.pair_id), task=TASK, target=target, split=split_of(item.source_id),
        source_id=item.source_id, prompt=item.pair.x.text, question="Which attention heads carry the answer?",
        explanation="", changed=False, output_before="", output_after="",
        query={"k": cfg.top_k, "relation": item.pair.x.relation, "subject": item.pair.x.subject,
               "counterfactual_subject": item.pair.x_prime.subject, "counterfactual_prompt": item.pair.x_prime.text})
        for item in items]


SPEC = TaskSpec(
    TASK, AnswerHeadsConfig, "which attention heads carry the answer from the counterfactual input?", "list",
    templates=(
        "Input: {prompt}\nCounterfactual input: {query[counterfactual_prompt]}\nWhich {query[k]} attention heads "
        "(layer.head), patched from the counterfactual input, move the answer most?",
        "When the model reads \"{prompt}\" but its attention heads read \"{query[counterfactual_prompt]}\", which "
        "{query[k]} heads carry the new answer?",
        "{prompt}\nName the {query[k]} attention heads that carry the answer here, strongest first, as layer.head, "
        "by patching them from: {query[counterfactual_prompt]}",
    ), explanation_tokens=30,
    # x and x' once each, then one row of one token per head (an 8B Llama's 1,024 heads: ~26 forwards)
    work=TaskWork(target_tokens=40, explainer_tokens=90, paper_items=21_919, passes=lambda cfg: 2 + 26,
                  records=split_records),
    build_items=build_items, run=run_answer_heads, identity_fields=("subject", "counterfactual_subject",
                                                                    "counterfactual_prompt"),
    explain_units=per_item_units(build_items, run_answer_heads, explain_queries, needs_target=False, unit_name="pair",
                                 items_of_inputs=items_of_inputs, with_source=with_counterfact_file))
