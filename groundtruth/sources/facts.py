"""Fact-recall prompts for activation patching: CounterFact-style facts and counterfactual pairs.

A fact is (subject, relation template with "{}" for the subject, true object). A pair (x, x') shares
the relation and one list of answer options and differs in subject and true object, so writing a
state of x' into x can move the answer from x's object to x''s.

Two sources: facts built from `countryinfo` (offline), and CounterFact as published (a JSON list of
records with `requested_rewrite: {prompt, subject, relation_id, target_true: {str}}`).
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError, DataSourceError
from .countries import load_countries
from .fields import read_json, text_field


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str  # relation id, e.g. "capital" or CounterFact's "P36"
    template: str  # "{}" marks the subject, e.g. "The capital of {} is"
    answer: str  # the true object

    @property
    def text(self) -> str:
        return self.template.format(self.subject)

    @property
    def fact_id(self) -> str:
        return f"{self.relation}:{self.subject}"


@dataclass(frozen=True)
class FactPair:
    """An original prompt x, its counterfactual x', and the answer options both share."""

    x: Fact
    x_prime: Fact
    options: tuple[str, ...]  # includes both answers, in a seeded order

    @property
    def pair_id(self) -> str:
        return f"{self.x.fact_id}|{self.x_prime.subject}"


COUNTRY_RELATIONS = {
    # relation: (template, attribute). Plain completions the offline models answer (docs/METHOD.md section 5).
    "capital": ("The capital of {} is", lambda c: c.capital),
    "language": ("The official language of {} is", lambda c: c.language),
    "region": ("{} is a country in", lambda c: c.region),
}


def country_facts(relations: list[str]) -> list[Fact]:
    """One fact per country and relation, from countryinfo (countries lacking the attribute skipped)."""
    unknown = set(relations) - set(COUNTRY_RELATIONS)
    if unknown:
        raise ConfigError(f"unknown country relations {sorted(unknown)} (known: {', '.join(COUNTRY_RELATIONS)})")
    facts = []
    for rel in relations:
        template, attr = COUNTRY_RELATIONS[rel]
        facts += [Fact(c.name, rel, template, attr(c)) for c in load_countries() if attr(c)]
    return facts


def load_counterfact(path: str) -> list[Fact]:
    """Facts from CounterFact's published JSON (a list of records; only `requested_rewrite` is used). Every
    field read is checked: a prompt holds exactly one "{}" for the subject; subject, relation id and true
    object are non-empty strings."""
    file = Path(path)
    if not file.exists():
        raise DataSourceError(f"CounterFact file {file} does not exist (the published counterfact.json)")
    return counterfact_facts(read_json(file), str(file))


def counterfact_facts(raw, where: str) -> list[Fact]:
    """Facts from CounterFact records (parsed JSON: a list of objects), checked as load_counterfact does;
    `where` names them in errors (a file, or a notebook's inputs)."""
    if not isinstance(raw, list):
        raise DataSourceError(f"{where}: expected a JSON list of CounterFact records, got {type(raw).__name__}")
    facts = [_counterfact_fact(rec, f"{where}: record {n}") for n, rec in enumerate(raw)]
    if not facts:
        raise DataSourceError(f"{where} holds no CounterFact records")
    return facts


def _counterfact_fact(rec, where: str) -> Fact:
    rewrite = rec.get("requested_rewrite") if isinstance(rec, dict) else None
    if not isinstance(rewrite, dict):
        raise DataSourceError(f"{where}: requested_rewrite must be an object, got {rewrite!r}")
    template = text_field(rewrite.get("prompt"), "requested_rewrite.prompt", where)
    if template.count("{}") != 1:
        raise DataSourceError(f"{where}: requested_rewrite.prompt {template!r} must hold exactly one '{{}}' "
                              "for the subject")
    subject = text_field(rewrite.get("subject"), "requested_rewrite.subject", where)
    relation = text_field(rewrite.get("relation_id"), "requested_rewrite.relation_id", where)
    target = rewrite.get("target_true")
    answer = text_field(target.get("str") if isinstance(target, dict) else None, "requested_rewrite.target_true.str", where)
    return Fact(subject, relation, template, answer.strip())


def make_pairs(facts: list[Fact], pairs_per_fact: int, n_options: int, seed: int,
               max_facts: Optional[int] = None, group_of: Optional[Callable[[Fact], str]] = None) -> list[FactPair]:
    """Counterfactual pairs: each fact x with `pairs_per_fact` facts x' of the same relation and prompt
    template (so x and x' differ only in the subject and positions align) and another answer, from the
    same group (`group_of`: the split, so that no prompt of a test pair is in train in either role).
    Options: both answers plus others of the relation, up to n_options, in a seeded order."""
    rng = random.Random(seed)
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_relation[fact.relation].append(fact)
    chosen = sorted(facts, key=lambda f: f.fact_id)
    if max_facts is not None:
        chosen = sorted(rng.sample(chosen, min(max_facts, len(chosen))), key=lambda f: f.fact_id)
    pairs = []
    for x in chosen:
        others = [f for f in by_relation[x.relation] if f.answer != x.answer and f.subject != x.subject
                  and f.template == x.template and (group_of is None or group_of(f) == group_of(x))]
        answers = sorted({f.answer for f in by_relation[x.relation]})
        for x_prime in rng.sample(others, min(pairs_per_fact, len(others))):
            extra = [a for a in answers if a not in (x.answer, x_prime.answer)]
            options = [x.answer, x_prime.answer] + rng.sample(extra, max(0, min(n_options - 2, len(extra))))
            rng.shuffle(options)
            pairs.append(FactPair(x, x_prime, tuple(options)))
    return pairs
