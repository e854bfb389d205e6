"""Plain text passages for fitting projections (and, later, SAEs): offline, from installed packages or
a user's file."""
from __future__ import annotations

import random
from pathlib import Path

from .countries import load_countries

_COUNTRY_SENTENCES = (
    # each uses facts countryinfo has; several phrasings so the fit sees varied syntax
    lambda c: f"The capital of {c.name} is {c.capital}.",
    lambda c: f"{c.capital} is the largest city and capital of {c.name}.",
    lambda c: f"{c.name} is a country in {c.subregion or c.region}.",
    lambda c: f"Many people in {c.name} speak {c.language}." if c.language else None,
    lambda c: f"People from {c.name} are called {c.demonym}." if c.demonym else None,
    lambda c: f"Last year we travelled from {c.capital} to the coast of {c.name} by train.",
    lambda c: f"Is {c.name} part of {c.region}? Yes, it lies in {c.subregion or c.region}.",
)


def country_sentences() -> list[str]:
    """Sentences stating (and talking around) countryinfo facts: about 1,500."""
    return [s for c in load_countries() for make in _COUNTRY_SENTENCES if (s := make(c))]


def load_passages(corpus: str, n: int, seed: int) -> list[str]:
    """n passages of a corpus, in a seeded random order: 'countries', or a .txt file (one per line)."""
    if corpus == "countries":
        passages = country_sentences()
    else:
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"corpus {corpus!r} is neither 'countries' nor a text file")
        passages = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not passages:
        raise ValueError(f"corpus {corpus!r} holds no text")
    rng = random.Random(seed)
    return rng.sample(passages, min(n, len(passages)))
