"""WordNet 3.0 from the Debian `wordnet-base` data files: synsets, their 45 lexical categories
(ready-made concept labels such as noun.animal or verb.motion) and their glosses' example sentences.

Read straight from the `data.{noun,verb,adj,adv}` files (format: wndb(5WN)); no NLTK. The folder is
/usr/share/wordnet unless SELFEXPLAIN_WORDNET names another (tests write a tiny one).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import DataSourceError

DEFAULT_DIR = "/usr/share/wordnet"
ENV = "SELFEXPLAIN_WORDNET"

# lexnames(5WN): file number -> (category, what its members denote). Descriptions are ours, shortened
# to read as the end of "words for ...".
LEXNAMES: dict[int, tuple[str, str]] = {
    0: ("adj.all", "descriptive qualities"), 1: ("adj.pert", "relations to a noun (pertainyms)"),
    2: ("adv.all", "manner, degree and circumstance"), 3: ("noun.Tops", "the most general things"),
    4: ("noun.act", "acts and actions"), 5: ("noun.animal", "animals"), 6: ("noun.artifact", "man-made objects"),
    7: ("noun.attribute", "attributes of people and objects"), 8: ("noun.body", "body parts"),
    9: ("noun.cognition", "thought and knowledge"), 10: ("noun.communication", "communication and language"),
    11: ("noun.event", "natural events"), 12: ("noun.feeling", "feelings and emotions"),
    13: ("noun.food", "foods and drinks"), 14: ("noun.group", "groups of people or objects"),
    15: ("noun.location", "places and spatial positions"), 16: ("noun.motive", "goals and motives"),
    17: ("noun.object", "natural objects"), 18: ("noun.person", "people and roles"),
    19: ("noun.phenomenon", "natural phenomena"), 20: ("noun.plant", "plants"),
    21: ("noun.possession", "possession and its transfer"), 22: ("noun.process", "natural processes"),
    23: ("noun.quantity", "quantities and units of measure"), 24: ("noun.relation", "relations"),
    25: ("noun.shape", "shapes"), 26: ("noun.state", "states of affairs"), 27: ("noun.substance", "substances"),
    28: ("noun.time", "time"), 29: ("verb.body", "grooming, dressing and bodily care"),
    30: ("verb.change", "change of size, temperature or state"), 31: ("verb.cognition", "thinking and judging"),
    32: ("verb.communication", "telling, asking and speaking"), 33: ("verb.competition", "fighting and sport"),
    34: ("verb.consumption", "eating and drinking"), 35: ("verb.contact", "touching, hitting and holding"),
    36: ("verb.creation", "making and performing"), 37: ("verb.emotion", "feeling"),
    38: ("verb.motion", "walking, flying and moving"), 39: ("verb.perception", "seeing and hearing"),
    40: ("verb.possession", "buying, selling and owning"), 41: ("verb.social", "social and political activity"),
    42: ("verb.stative", "being and having"), 43: ("verb.weather", "weather"), 44: ("adj.ppl", "participial qualities"),
}
_QUOTED = re.compile(r'"([^"]{12,})"')


@dataclass(frozen=True)
class Synset:
    category: str  # lexical category, e.g. 'noun.animal'
    words: tuple[str, ...]  # lemmas, lower case, spaces for underscores
    gloss: str  # the definition, without example sentences
    examples: tuple[str, ...]  # the gloss's quoted example sentences


def wordnet_dir() -> Path:
    root = Path(os.environ.get(ENV, DEFAULT_DIR))
    if not (root / "data.noun").is_file():
        raise DataSourceError(
            f"WordNet data not found in {root} (no data.noun): install Debian's wordnet-base "
            f"(`apt-get install wordnet-base`, which `make install` does) or set {ENV} to a WordNet 3.0 dict folder")
    return root


def parse_data_line(line: str) -> Synset:
    """One synset line of a data.* file (wndb(5WN)): offset lex_filenum ss_type w_cnt (word lex_id)* ... | gloss."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    lexnum, n_words = int(fields[1]), int(fields[3], 16)
    words = tuple(re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ").lower() for i in range(n_words))
    examples = tuple(_QUOTED.findall(gloss))
    definition = gloss.split(';')[0].strip()
    return Synset(LEXNAMES[lexnum][0], words, definition, examples)


@lru_cache(maxsize=2)
def load_synsets(root: str = "") -> tuple[Synset, ...]:
    """Every synset of the four data files ("" means wordnet_dir())."""
    folder = Path(root) if root else wordnet_dir()
    synsets = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = folder / f"data.{pos}"
        if not path.exists():
            continue
        with path.open(encoding="utf-8", errors="replace") as fh:
            synsets += [parse_data_line(line.rstrip("\n")) for line in fh if line[:1].isdigit()]
    return tuple(synsets)


@lru_cache(maxsize=2)
def category_members(root: str = "") -> dict[str, frozenset[str]]:
    """Lexical category -> its single-word lemmas (a word is in every category one of its senses is)."""
    members: dict[str, set[str]] = {}
    for s in load_synsets(root):
        members.setdefault(s.category, set()).update(w for w in s.words if " " not in w)
    return {c: frozenset(ws) for c, ws in members.items()}


def category_description(category: str) -> str:
    """What a category's members denote, e.g. 'animals' for noun.animal."""
    for name, meaning in LEXNAMES.values():
        if name == category:
            return meaning
    raise KeyError(f"unknown WordNet lexical category {category!r}")


def wordnet_sentences(root: str = "") -> list[str]:
    """The glosses' example sentences (about 48k), then definitions: varied, everyday English."""
    synsets = load_synsets(root)
    return [e for s in synsets for e in s.examples] + [s.gloss[0].upper() + s.gloss[1:] + "." for s in synsets if s.gloss]
