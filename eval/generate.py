"""Explainer inference: batched greedy explanations for records."""
from __future__ import annotations

from groundtruth.generation import PromptFormat, greedy_generate
from groundtruth.records import Record
from training.batches import encode_prompt


def explain(model, tokenizer, records: list[Record], fmt: PromptFormat, max_new_tokens: int,
            batch_size: int = 16) -> list[str]:
    """The explainer's greedy answer to each record's question, in record order."""
    prompts = [encode_prompt(tokenizer, r, fmt) for r in records]
    return greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
