"""Describers write candidate descriptions of a feature from its exemplars (a registry: name ->
factory). The pipeline keeps, per feature, the candidate with the best simulation score.

- `top_tokens`: the tokens that most often carry a top exemplar's peak: 'the tokens "Paris" and "Rome"'.
- `wordnet`: the WordNet lexical category whose membership best matches where the feature is active
  (F1 over the tokens of the exemplars and negatives), with member words from the exemplars:
  'words for animals (noun.animal), such as "dog" and "horse"'.
- `llm`: a chat model (an OpenAI-compatible endpoint, or a model in this process: local_chat.py) shown
  the exemplars with the active tokens marked.
- `neuronpedia`: descriptions from a Neuronpedia explanations export (see neuronpedia.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from tqdm import tqdm

from .endpoint import ChatClient, EndpointConfig, client_for
from .exemplars import FeatureExemplars
from .simulators import Simulator, simulation_score, word_of

Describer = Callable[[FeatureExemplars], list[str]]
ACTIVE = 0.5  # a token counts as active at this fraction of the feature's peak activation


def quote_list(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def peak_tokens(ex: FeatureExemplars) -> Counter:
    """How often each (stripped) token carries the peak of a top exemplar."""
    return Counter(t for w in ex.top if w.acts and (t := w.tokens[w.acts.index(max(w.acts))].strip()))


def top_tokens(ex: FeatureExemplars, sizes: tuple[int, ...] = (1, 2, 3)) -> list[str]:
    ranked = [t for t, _ in peak_tokens(ex).most_common(max(sizes))]
    return [("the token " if n == 1 else "the tokens ") + quote_list(ranked[:n]) for n in sizes if n <= len(ranked)]


def _f1(member: list[bool], active: list[bool]) -> float:
    tp = sum(m and a for m, a in zip(member, active))
    fp = sum(m and not a for m, a in zip(member, active))
    fn = sum(a and not m for m, a in zip(member, active))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def wordnet_categories(ex: FeatureExemplars, members: dict[str, frozenset], best: int = 2) -> list[tuple[str, float, list[str]]]:
    """The `best` categories by F1 of membership against activity: (category, F1, example words)."""
    peak = max((w.peak for w in ex.top), default=0.0)
    if peak <= 0:
        return []
    words = [word_of(t) for w in ex.windows() for t in w.tokens]
    active = [a >= ACTIVE * peak for w in ex.windows() for a in w.acts]
    active_words = Counter(w for w, a in zip(words, active) if a and w)
    scored = []
    for category in {c for c, ms in members.items() if any(w in ms for w in active_words)}:
        ms = members[category]
        f1 = _f1([w in ms for w in words], active)
        examples = [w for w, _ in active_words.most_common() if w in ms][:3]
        scored.append((category, f1, examples))
    return sorted(scored, key=lambda s: (-s[1], s[0]))[:best]


def wordnet_describer(members: Optional[dict[str, frozenset]] = None) -> Describer:
    from ..sources.wordnet import category_description, category_members

    def describe(ex: FeatureExemplars) -> list[str]:
        table = members if members is not None else category_members()
        return [f"words for {category_description(c)} ({c}), such as {quote_list(examples)}"
                for c, _, examples in wordnet_categories(ex, table) if examples]
    return describe


_DESCRIBE_PROMPT = """Here are texts on which one feature of a language model fires. Tokens where it fires
are marked <<like this>> (strongest first).

{texts}

In one short phrase (under 15 words), what does the feature respond to? Answer with the phrase only."""


def marked_exemplars(ex: FeatureExemplars) -> str:
    """The top exemplars, one per line, tokens at ACTIVE of their window's peak marked <<like this>>."""
    texts = []
    for w in ex.top:
        cut = ACTIVE * w.peak
        texts.append("".join(f"<<{t}>>" if a >= cut and a > 0 else t for t, a in zip(w.tokens, w.acts)))
    return "\n".join(texts)


class LLMDescriber:
    """Asks a chat model for a phrase per feature; `many` sends a list of features' requests together
    (a local model decodes them in batches)."""

    def __init__(self, client: ChatClient):
        self.client = client

    @staticmethod
    def request(ex: FeatureExemplars) -> list[dict]:
        return [{"role": "user", "content": _DESCRIBE_PROMPT.format(texts=marked_exemplars(ex))}]

    @staticmethod
    def phrase(reply: str) -> list[str]:
        phrase = reply.strip().splitlines()[0].strip().strip('"') if reply.strip() else ""
        return [phrase] if phrase else []

    def __call__(self, ex: FeatureExemplars) -> list[str]:
        return self.many([ex])[0]

    def many(self, exemplars: list[FeatureExemplars]) -> list[list[str]]:
        return [self.phrase(r) for r in self.client.complete_many([self.request(ex) for ex in exemplars])]


@dataclass
class DescriberSettings:
    """What describers may need beyond the exemplars (filled from the task config)."""

    endpoint: Optional[EndpointConfig] = None
    neuronpedia: Optional[dict] = None  # (layer, feature) -> descriptions


def neuronpedia_describer(table: Optional[dict]) -> Describer:
    if table is None:
        raise ValueError("the neuronpedia describer needs an explanations export (neuronpedia: PATH in the task config)")
    return lambda ex: list(table.get((ex.layer, ex.feature), []))


DESCRIBERS: dict[str, Callable[[DescriberSettings], Describer]] = {
    "top_tokens": lambda s: top_tokens,
    "wordnet": lambda s: wordnet_describer(),
    "llm": lambda s: LLMDescriber(client_for(s.endpoint, "the llm describer")),
    "neuronpedia": lambda s: neuronpedia_describer(s.neuronpedia),
}
"""Describer name -> factory(settings) -> describer(exemplars) -> candidate descriptions."""


def describe_features(exemplars: list[FeatureExemplars], describers: dict[str, Describer],
                      chunk: int = 64) -> list[dict[str, list[str]]]:
    """Per feature, each describer's candidates. A describer with a `many` method (an LLM) gets the
    features `chunk` at a time, with a progress bar; the others one by one."""
    out: list[dict[str, list[str]]] = [{} for _ in exemplars]
    for name, describe in describers.items():
        many = getattr(describe, "many", None)
        if many is None:
            texts = [describe(ex) for ex in exemplars]
        else:
            texts = []
            for first in tqdm(range(0, len(exemplars), chunk), desc=f"describing ({name})", unit="chunk",
                              disable=len(exemplars) <= chunk):
                texts += many(exemplars[first:first + chunk])
        for row, candidates in zip(out, texts):
            row[name] = candidates
    return out


def best_description(ex: FeatureExemplars, candidates: dict[str, list[str]],
                     simulator: Simulator) -> Optional[tuple[str, str, float, list[dict]]]:
    """(description, describer, simulation score, every candidate with its score) among one feature's
    candidates (describer -> texts), or None when there are none. Ties keep the earlier describer's."""
    scored = [{"describer": name, "description": text, "simulation": round(simulation_score(simulator, text, ex), 4)}
              for name, texts in candidates.items() for text in texts]
    if not scored:
        return None
    best = max(scored, key=lambda c: c["simulation"])  # max keeps the first of equals
    return best["description"], best["describer"], best["simulation"], scored
