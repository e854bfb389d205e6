"""Explainer inputs and labels: prompt templates, label masks, padding, and the order of micro-batches."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from selfexplain.groundtruth.errors import ConfigError
from selfexplain.groundtruth.generation import PromptFormat, render_prompt
from selfexplain.groundtruth.records import Record
from selfexplain.groundtruth.tasks import task_spec

from .explainer import SPECIAL_TOKENS, VECTOR_TEXT
from .projection import vector_key

IGNORE = -100  # label value cross-entropy skips


def _layer_text(layers: Optional[list[int]]) -> str:
    if not layers:
        return ""
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def explainer_text(record: Record, with_vector: bool = True) -> str:
    """The explainer's question about a record, as plain text."""
    templates = task_spec(record.task).templates  # the task's own (groundtruth/tasks.py TaskSpec)
    pick = int(hashlib.sha256(record.record_id.encode()).hexdigest(), 16) % len(templates)
    return templates[pick].format(prompt=record.prompt, question=record.question,
                                  vec=VECTOR_TEXT if with_vector and record.vector is not None else "",
                                  layers=_layer_text(record.layers), token=record.query.get("token", ""),
                                  position=record.query.get("position", ""), query=record.query)


def encode_prompt(tokenizer, record: Record, fmt: PromptFormat, with_vector: bool = True) -> list[int]:
    """Token ids the explainer sees, ending where its answer starts (what eval generates from)."""
    return render_prompt(tokenizer, explainer_text(record, with_vector), fmt)


@dataclass
class Example:
    """One training example: token ids, labels, and the vector its [vec] token stands for (if any)."""

    ids: list[int]
    labels: list[int]
    vector: Optional[np.ndarray] = None  # [d_target]
    key: Optional[str] = None  # vector_key of the vector's target layers


def encode_example(tokenizer, record: Record, fmt: PromptFormat, max_len: int) -> Example:
    """One record as an Example: labels are the explanation tokens plus EOS, IGNORE elsewhere.

    A prompt too long for max_len loses tokens from its start; the explanation is never cut (nor may
    the cut reach the [vec] token).
    """
    prompt = encode_prompt(tokenizer, record, fmt)
    answer = tokenizer(record.explanation, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(answer) >= max_len:
        raise ConfigError(f"record {record.record_id}: explanation alone is {len(answer)} tokens, max_seq_len is {max_len}")
    cut = max(0, len(prompt) + len(answer) - max_len)
    if record.vector is not None and tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[1]) in prompt[:cut]:
        raise ConfigError(f"record {record.record_id}: max_seq_len {max_len} would cut the [vec] token from the prompt")
    prompt = prompt[cut:]
    key = vector_key(record.layers) if record.vector is not None else None
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer, record.vector, key)


def collate(examples: Sequence[Example], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels, each [B, T]; for vector tasks also
    vectors [B, d_target] and vector_keys [B]."""
    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.ids)] = torch.tensor(e.ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.ids)] = 1
    batch: dict = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if any(e.vector is not None for e in examples):
        batch["vectors"] = torch.from_numpy(np.stack([e.vector for e in examples if e.vector is not None]))
        batch["vector_keys"] = [e.key for e in examples if e.vector is not None]
    return batch


def micro_batch_order(lengths: Sequence[int], rank: int, world: int, micro: int, seed: int, epoch: int,
                      window: int = 16) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch.

    One seeded permutation per epoch, dealt round-robin to ranks and cut to the same length on every
    rank, so every rank takes the same number of steps (a rank that ran out would hang the others).
    Within each run of `window` micro-batches the examples are sorted by length (`lengths[i]`: tokens
    of example i) before the cut, and the micro-batches are then shuffled: on the study's records this
    takes padding from 7-21% of the tokens to 1-3%, while batches still mix afresh each epoch.
    window 1: no sorting.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    per_rank = len(lengths) // world
    mine = order[rank::world][:per_rank]
    if window > 1:
        span = micro * window
        mine = [i for start in range(0, per_rank, span) for i in sorted(mine[start:start + span], key=lambda i: lengths[i])]
    batches = [mine[i:i + micro] for i in range(0, per_rank - micro + 1, micro)]
    if window > 1:
        rng.shuffle(batches)  # else each window would run from its shortest batch to its longest
    return batches


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the tokens in right-padded batches that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0
