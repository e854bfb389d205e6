"""Gradient token attribution as a ground-truth task: which input word the target's answer depends on most.

For a fact prompt ("The capital of France is"), integrated gradients (captum's `IntegratedGradients`, on
the input embeddings) attribute the log-probability of the target's greedy next token to the words of
the prompt text: the baseline is the padding token's embedding at every position of the text (a few-shot
preamble and special tokens keep their own), a token's attribution is summed over the embedding's dimensions, and a word's is
the sum over its tokens. The explanation names the top word ("The output depends most on <<<France>>>.");
the record keeps the top words in order, every word's attribution and the completeness gap (the sum of
the attributions against the metric's change from the baseline, which integrated gradients make equal in
the limit). An item whose relative gap exceeds `max_completeness_gap` is dropped and counted.

The binary label balancing and the self/cross split read is whether the top word is in the subject.
Words are the text split on spaces (punctuation stripped), so two models' labels of one prompt compare.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from .dataset import DROPPED, SplitConfig
from .errors import DataSourceError
from .explanations import WORD_EDGES, format_attribution
from .generation import PromptFormat, prompt_string
from .kv_cache import cache_kwargs, cache_of
from .models import model_device
from .records import Record, safe_key
from .sources.facts import Fact, country_facts
from .taskspec import TaskSpec, TaskWork
from .units import per_item_units

TASK = "token_attribution"


@dataclass
class TokenAttributionConfig(SplitConfig):
    """Ground truth for gradient token attribution."""

    relations: list[str] = field(default_factory=lambda: ["capital", "language"])
    """Country relations whose fact prompts are attributed: capital | language | region."""
    max_facts: int | None = None
    """Use at most this many facts, chosen at random (seeded); null: all."""
    target_format: PromptFormat = "plain"
    """How the target sees its prompt: chat template, plain text, or auto."""
    system_prompt: str | None = None
    """System prompt (chat) or preamble (plain), e.g. a few solved facts; never attributed. Without one the
    integral does not converge on SmolLM2 (completeness gaps past 100% at 16-64 steps, with the baseline
    at most of the input); with the study's four facts, 32 steps leave gaps under 4%."""
    steps: int = 32
    """Integration steps of integrated gradients (Riemann, captum's gauss-legendre by default)."""
    max_completeness_gap: float = 0.1
    """Drop an item whose |sum of attributions - metric change| exceeds this share of |metric change|."""
    top_k: int = 3
    """Top words kept per record (recall@k)."""

    def check(self) -> None:
        super().check()
        if self.steps < 2:
            raise ValueError(f"steps: must be at least 2, got {self.steps}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {self.top_k}")


@dataclass(frozen=True)
class AttributionItem:
    source_id: str
    fact: Fact


def build_items(cfg: TokenAttributionConfig, seed: int) -> list[AttributionItem]:
    facts = country_facts(cfg.relations)
    if cfg.max_facts is not None:
        facts = random.Random(seed).sample(facts, min(cfg.max_facts, len(facts)))
    if not facts:
        raise DataSourceError(f"token_attribution: relations {cfg.relations} gave no facts")
    return [AttributionItem(f.fact_id, f) for f in facts]


def words_of(text: str) -> list[tuple[int, int, str]]:
    """(start, end, word) of each space-separated word of text, punctuation stripped from the word."""
    out, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isspace():
            if start is not None:
                word = text[start:i].strip(WORD_EDGES)
                if word:
                    out.append((start, i, word))
                start = None
        elif start is None:
            start = i
    return out


def _encode(tokenizer, cfg: TokenAttributionConfig, text: str) -> tuple[torch.Tensor, list[int]]:
    """Token ids of the prompt and, per token, the index of the text's word it lies in (-1: outside)."""
    string, special = prompt_string(tokenizer, text, cfg.target_format, cfg.system_prompt)
    enc = tokenizer(string, add_special_tokens=special, return_offsets_mapping=True)
    base, words = string.rfind(text), words_of(text)
    owner = []
    for start, end in enc["offset_mapping"]:
        last = end - 1 - base  # a token's last character: a leading space belongs to no word
        owner.append(next((w for w, (s, e, _) in enumerate(words) if end > start and s <= last < e), -1))
    return torch.tensor(enc["input_ids"]), owner


def reference_token(tokenizer) -> int:
    """The baseline's token: the tokenizer's padding token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def attribute(model, ids: torch.Tensor, owner: list[int], n_words: int, steps: int,
              reference: int) -> tuple[int, list[float], float, float]:
    """(greedy token, attribution per word, metric change from the baseline, completeness gap): integrated
    gradients of log p(greedy token) over the input embeddings of the text's tokens, from a baseline that
    puts the `reference` token's embedding at each of them (a zero embedding would take the path through
    the RMS norms' singular point, where the integral does not converge).

    Every position before the text's first token (the preamble) is the same on the whole path, so its keys
    and values are computed once and every step of the integral runs from the text on: the preamble is
    most of the prompt."""
    from captum.attr import IntegratedGradients

    device = model_device(model)
    embed = model.get_input_embeddings()
    start = next(t for t, w in enumerate(owner) if w >= 0)  # the text's first token
    with torch.no_grad():
        embeds = embed(ids[None].to(device)).float()  # [1, T, d], Gemma's scale included
        neutral = embed(torch.tensor([[reference]], device=device)).float()  # [1, 1, d]
        prefix = cache_of(model(input_ids=ids[None, :start].to(device), use_cache=True, logits_to_keep=1)) if start else None
    inside = torch.tensor([w >= 0 for w in owner], device=device)[None, :, None]
    text = embeds[:, start:]  # [1, T - start, d]
    baseline = torch.where(inside, neutral.expand_as(embeds), embeds)[:, start:]

    def logits(x: torch.Tensor) -> torch.Tensor:  # x: [n, T - start, d] -> the last position's logits [n, V]
        past = None
        if prefix is not None:
            past = copy.deepcopy(prefix)  # a forward appends to its cache
            past.batch_repeat_interleave(len(x))
        # the last position's logits only: all of them would be [steps, T, vocab] (2 GB for Gemma's 262k)
        return model(inputs_embeds=x.to(model.dtype), **cache_kwargs(model, past), use_cache=past is not None,
                     logits_to_keep=1).logits[:, -1].float()

    with torch.no_grad():
        token = int(logits(text)[0].argmax())

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return logits(x).log_softmax(-1)[:, token]

    with torch.enable_grad():
        attributions, delta = IntegratedGradients(log_p).attribute(text, baselines=baseline, n_steps=steps,
                                                                   internal_batch_size=steps,
                                                                   return_convergence_delta=True)
    per_word = [0.0] * n_words
    for value, w in zip(attributions[0].sum(-1).tolist(), owner[start:]):
        if w >= 0:
            per_word[w] += value
    with torch.no_grad():
        change = float(log_p(text) - log_p(baseline))
    return token, per_word, change, float(delta)


def run_attribution(model, tokenizer, items: list[AttributionItem], cfg: TokenAttributionConfig, target: str,
                    split_of: Callable[[str], str], batch_size: int = 16) -> list[Record]:
    """One record per fact: its top word by integrated gradients. batch_size is unused: one item's
    integration steps make one batch."""
    records = []
    for item in items:
        text, words = item.fact.text, words_of(item.fact.text)
        ids, owner = _encode(tokenizer, cfg, text)
        token, per_word, change, gap = attribute(model, ids, owner, len(words), cfg.steps, reference_token(tokenizer))
        order = sorted(range(len(words)), key=lambda w: -per_word[w])
        at = text.index(item.fact.subject)
        subject = {w for w, (s, e, _) in enumerate(words) if s < at + len(item.fact.subject) and e > at}
        top = words[order[0]][2]
        relative_gap = abs(gap) / max(abs(change), 1e-6)
        record = Record(
            record_id=safe_key(target, TASK, item.source_id), task=TASK, target=target, split=split_of(item.source_id),
            source_id=item.source_id, prompt=text, question="Which input word does the output depend on most?",
            explanation=format_attribution(top), changed=order[0] in subject,
            output_before=tokenizer.decode([token]).strip(), output_after=top,
            query={"words": [w for _, _, w in words], "top_words": [words[w][2] for w in order[:cfg.top_k]],
                   "attributions": [round(a, 4) for a in per_word], "subject_word": words[max(subject)][2],
                   "relation": item.fact.relation, "subject": item.fact.subject,
                   "completeness_gap": round(relative_gap, 4)})
        if relative_gap > cfg.max_completeness_gap:
            record.query[DROPPED] = "completeness gap"
        records.append(record)
    return records


def explain_queries(model, tokenizer, items: list[AttributionItem], cfg: TokenAttributionConfig, target: str,
                    split_of: Callable[[str], str]) -> list[Record]:
    """Every fact as an unlabelled record: the question needs no target."""
    return [Record(record_id=safe_key(target, TASK, it.source_id), task=TASK, target=target,
                   split=split_of(it.source_id), source_id=it.source_id, prompt=it.fact.text,
                   question="Which input word does the output depend on most?", explanation="", changed=False,
                   output_before="", output_after="",
                   query={"words": [w for _, _, w in words_of(it.fact.text)], "relation": it.fact.relation,
                          "subject": it.fact.subject})
            for it in items]


def same_item(record: Record) -> str:
    return record.source_id


SPEC = TaskSpec(
    TASK, TokenAttributionConfig, "which input word does the output depend on most?", "attribution",
    templates=(
        "Input: {prompt}\nWhich word of the input does the model's next word depend on most?",
        "The model reads: {prompt}\nName the input word its output depends on most.",
    ), explanation_tokens=20,
    # a fact prompt ~10 tokens (with a preamble ~40); integrated gradients: `steps` forwards and backwards
    work=TaskWork(target_tokens=40, explainer_tokens=60, paper_items=0, passes=lambda cfg: 1 + 3 * cfg.steps),
    build_items=build_items, run=run_attribution, same_item=same_item, identity_fields=("subject",),
    explain_units=per_item_units(build_items, run_attribution, explain_queries, needs_target=False, unit_name="prompt"))
