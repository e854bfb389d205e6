"""Plain text passages for fitting projections and training SAEs: offline, from installed packages or
a user's file.

Named corpora: 'countries' (sentences about countryinfo facts), 'wordnet' (WordNet's example
sentences and definitions, Debian wordnet-base), 'fortunes' (Debian fortunes-min: quotations,
literature, riddles). Anything else is read as a text file, one passage per line.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Union

from ..errors import DataSourceError
from .countries import load_countries
from .wordnet import wordnet_sentences

FORTUNES_DIR = Path("/usr/share/games/fortunes")

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


def fortunes(folder: Path = FORTUNES_DIR) -> list[str]:
    """The fortune cookies of Debian's fortunes-min, one passage each (whitespace collapsed)."""
    files = [f for f in sorted(folder.glob("*")) if f.is_file() and not f.suffix] if folder.is_dir() else []
    if not files:
        raise DataSourceError(f"no fortune files in {folder}: install Debian's fortunes-min (`make install` does)")
    texts = [re.sub(r"\s+", " ", t).strip() for f in files for t in f.read_text(errors="replace").split("\n%\n")]
    return [t for t in texts if len(t) > 20]


CORPORA: dict[str, Callable[[], list[str]]] = {
    "countries": country_sentences,
    "wordnet": wordnet_sentences,
    "fortunes": fortunes,
}
"""Named corpora -> their passages."""


def load_passages(corpus: Union[str, list[str]], n: int, seed: int) -> list[str]:
    """n passages of a corpus (or of several, pooled), in a seeded random order: a name of CORPORA, or
    a .txt file (one passage per line)."""
    passages: list[str] = []
    for name in [corpus] if isinstance(corpus, str) else corpus:
        if name in CORPORA:
            passages += CORPORA[name]()
            continue
        path = Path(name)
        if not path.is_file():
            raise DataSourceError(f"corpus {name!r} is neither one of {', '.join(CORPORA)} nor a text file")
        passages += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not passages:
        raise DataSourceError(f"corpus {corpus!r} holds no text")
    rng = random.Random(seed)
    return rng.sample(passages, min(n, len(passages)))
