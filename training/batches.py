"""Explainer inputs and labels: prompt templates, label masks, padding."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from groundtruth.generation import PromptFormat, render_prompt
from groundtruth.records import Record

IGNORE = -100  # label value cross-entropy skips

TEMPLATES: dict[str, list[str]] = {
    # task -> templates; one is picked per record (by a hash of its id, so the choice is stable)
    "input_ablation": ["{prompt}\n\n{question}"],
}
"""Explainer prompt templates per task. Fields: {prompt} (the target's input), {question}."""


def explainer_text(record: Record) -> str:
    """The explainer's question about a record, as plain text."""
    templates = TEMPLATES.get(record.task)
    if not templates:
        raise KeyError(f"no explainer templates for task {record.task!r} (known: {', '.join(TEMPLATES)})")
    pick = int(hashlib.sha256(record.record_id.encode()).hexdigest(), 16) % len(templates)
    return templates[pick].format(prompt=record.prompt, question=record.question)


def encode_prompt(tokenizer, record: Record, fmt: PromptFormat) -> list[int]:
    """Token ids the explainer sees, ending where its answer starts (what eval generates from)."""
    return render_prompt(tokenizer, explainer_text(record), fmt)


def encode_example(tokenizer, record: Record, fmt: PromptFormat, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one record: labels are the explanation tokens plus EOS, IGNORE elsewhere.

    A prompt too long for max_len loses tokens from its start; the explanation is never cut.
    """
    prompt = encode_prompt(tokenizer, record, fmt)
    answer = tokenizer(record.explanation, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(answer) >= max_len:
        raise ValueError(f"record {record.record_id}: explanation alone is {len(answer)} tokens, max_seq_len is {max_len}")
    prompt = prompt[max(0, len(prompt) + len(answer) - max_len):]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each [B, T]."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
