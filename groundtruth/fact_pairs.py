"""Counterfactual fact pairs as a patching task's target sees them: the pairs (x, x'), their prompts, and
the token types of each prompt, shared by every technique that patches x with x' (blocks, heads).

Token types: subject_final (last subject token), relation (the relation template's words),
original_option / new_option / other_option (inside the forced-choice option list: x's answer, x''s
answer, another), other (non-final subject tokens, BOS, chat-template and instruction tokens).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from .dataset import SplitConfig, split_of
from .errors import DataSourceError
from .generation import PromptFormat, prompt_string
from .sources.facts import FactPair, counterfact_facts, country_facts, load_counterfact, make_pairs


@dataclass
class FactPairConfig(SplitConfig):
    """Counterfactual fact pairs (x, x') and how the target sees them: the settings every patching task shares."""

    source: Literal["countries", "counterfact"] = "countries"
    """Facts: built from countryinfo (offline), or CounterFact as published (see counterfact_path)."""
    counterfact_path: Optional[str] = None
    """The published counterfact.json (source: counterfact)."""
    relations: list[str] = field(default_factory=lambda: ["capital", "language", "region"])
    """Country relations to use (source: countries): capital | language | region."""
    max_facts: Optional[int] = None
    """Use at most this many original facts x, chosen at random (seeded); null: all."""
    pairs_per_fact: int = 1
    """Counterfactuals x' per original fact."""
    prompt_format: Literal["plain", "forced_choice"] = "plain"
    """plain completion ("The capital of France is"), or the paper's forced-choice suffix. On SmolLM2
    the forced-choice chat prompt answers "The" to everything (docs/METHOD.md section 5)."""
    forced_choice_suffix: str = "\nRespond with one of {options} or unknown and nothing else."
    """Appended in forced_choice format; {options} is the options joined by ' or '."""
    n_options: int = 5
    """Answer options per pair in forced_choice format (both answers included)."""
    target_format: PromptFormat = "plain"
    """How the target sees its prompt: chat template, plain text, or auto."""
    system_prompt: Optional[str] = None
    """System prompt (chat) or preamble (plain), e.g. a few solved facts: small models then answer
    with a name instead of continuing "The capital of France is" with "the"."""
    def check(self) -> None:
        super().check()
        if self.source == "counterfact" and not self.counterfact_path:
            raise ValueError("counterfact_path: required when source is 'counterfact'")
        if self.pairs_per_fact < 1:
            raise ValueError(f"pairs_per_fact: must be at least 1, got {self.pairs_per_fact}")
        if self.n_options < 2:
            raise ValueError(f"n_options: must be at least 2 (both answers), got {self.n_options}")

    def label_settings(self) -> str:
        return ("prompt_format, target_format, system_prompt, or the target model's "
                "chat_template_kwargs (Qwen3: {enable_thinking: false})")


@dataclass(frozen=True)
class PatchItem:
    """One counterfactual pair: the unit of work of a patching technique."""

    source_id: str  # the original fact: train and test never share one
    pair: FactPair


def build_items(cfg: FactPairConfig, seed: int) -> list[PatchItem]:
    """The counterfactual pairs; a pair's split is its x's, and its x' is drawn from the same split."""
    facts = load_counterfact(cfg.counterfact_path) if cfg.source == "counterfact" else country_facts(cfg.relations)
    pairs = make_pairs(facts, cfg.pairs_per_fact, cfg.n_options, seed, cfg.max_facts,
                       group_of=lambda fact: split_of(fact.fact_id, cfg.test_fraction, seed))
    if not pairs:
        raise DataSourceError(f"source {cfg.source!r} gave no counterfactual pairs")
    return [PatchItem(p.x.fact_id, p) for p in pairs]


def items_of_inputs(cfg: FactPairConfig, inputs: list) -> list[PatchItem]:
    """The counterfactual pairs of facts a person brings (CounterFact records, as counterfact_path holds
    them): each fact with another of the same relation and template as x'."""
    pairs = make_pairs(counterfact_facts(inputs, "inputs"), cfg.pairs_per_fact, cfg.n_options, seed=0)
    if not pairs:
        raise DataSourceError("the inputs make no counterfactual pair (it takes two facts of "
                              "one relation and prompt template with different answers)")
    return [PatchItem(p.x.fact_id, p) for p in pairs]


def with_counterfact_file(cfg: FactPairConfig, path: str) -> FactPairConfig:
    """The config whose facts are a CounterFact file's (`selfexplain explain --source`)."""
    return dataclasses.replace(cfg, source="counterfact", counterfact_path=path, max_facts=None)



@dataclass
class PatchPrompt:
    """One side of a pair as the target sees it."""

    text: str  # the user text (what the explainer is shown)
    ids: torch.Tensor  # [T]
    token_types: list[str]  # [T]
    subject: tuple[int, int]  # first and last token index of the subject
    text_positions: list[int]  # tokens inside the prompt text, then the last position


def user_text(cfg: FactPairConfig, pair: FactPair, fact) -> str:
    if cfg.prompt_format == "forced_choice":
        return fact.text + cfg.forced_choice_suffix.format(options=" or ".join(pair.options))
    return fact.text


def encode_side(tokenizer, cfg: FactPairConfig, pair: FactPair, fact) -> PatchPrompt:
    """Tokenize one prompt of a pair and type its tokens from their character offsets."""
    text = user_text(cfg, pair, fact)
    string, special = prompt_string(tokenizer, text, cfg.target_format, cfg.system_prompt)
    enc = tokenizer(string, add_special_tokens=special, return_offsets_mapping=True)
    base = string.rfind(text)
    sub_start = base + fact.template.index("{}")
    sub_end = sub_start + len(fact.subject)
    relation_end = base + len(fact.text)
    option_spans = []  # (start, end, type) inside the suffix
    if cfg.prompt_format == "forced_choice":
        cursor = relation_end
        for option in pair.options:
            at = string.find(option, cursor)
            if at >= 0:
                kind = ("original_option" if option == pair.x.answer else
                        "new_option" if option == pair.x_prime.answer else "other_option")
                option_spans.append((at, at + len(option), kind))
                cursor = at + len(option)
    types, subject_tokens, inside = [], [], []
    for n, (start, end) in enumerate(enc["offset_mapping"]):
        kind = "other"
        if end > start and base <= start and end <= base + len(text):
            inside.append(n)
        if end > start:
            if start < sub_end and end > sub_start:
                subject_tokens.append(n)
            elif base <= start < relation_end:
                kind = "relation"
            else:
                kind = next((k for s, e, k in option_spans if start < e and end > s), "other")
        types.append(kind)
    if not subject_tokens:
        raise ValueError(f"subject {fact.subject!r} not found among the tokens of {string!r}")
    types[subject_tokens[-1]] = "subject_final"  # non-final subject tokens stay 'other'
    last = len(enc["input_ids"]) - 1
    return PatchPrompt(text, torch.tensor(enc["input_ids"]), types, (subject_tokens[0], subject_tokens[-1]),
                       inside + ([last] if last not in inside else []))


def encode_pair(tokenizer, cfg: FactPairConfig, item: PatchItem) -> tuple[PatchPrompt, PatchPrompt]:
    """Both prompts of an item's pair, x and x', as the target sees them."""
    return encode_side(tokenizer, cfg, item.pair, item.pair.x), encode_side(tokenizer, cfg, item.pair, item.pair.x_prime)


def whole_answer(tokenizer, token: int, options: tuple[str, ...]) -> str:
    """The answer a greedy next token stands for: the one option it begins (whole words, as the paper's
    forced-choice answers are: "Br" -> "Brazil"), else the token's text when it begins none or several."""
    text = tokenizer.decode([token]).strip()
    begun = [o for o in options if text and o.startswith(text)]
    return begun[0] if len(begun) == 1 else text
