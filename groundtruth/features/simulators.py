"""Simulators predict a feature's activation at each token from a description; the simulation score
is |Pearson r| between predicted and true activations over the feature's top exemplars and random
negatives (the paper's score for choosing and grading descriptions). A registry: name -> factory.

`lexical` (offline) reads the two forms the offline describers write: quoted tokens ('the tokens
"Paris" and "Rome"') predict 1 where a token is one of them, and a WordNet category named as
'(noun.animal)' predicts 0.5 where a token's word is a member. `llm` asks an endpoint.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Protocol

import numpy as np

from .endpoint import ChatClient, EndpointConfig, build, client_for
from .exemplars import FeatureExemplars, Window

_QUOTED = re.compile(r'"([^"]+)"')
_CATEGORY = re.compile(r"\b((?:noun|verb|adj|adv)\.[A-Za-z]+)\b")


def word_of(token: str) -> str:
    """A token as a comparable word: stripped of spaces and punctuation, lower case."""
    return re.sub(r"[^\w'-]", "", token).lower()


class Simulator(Protocol):
    def predict(self, description: str, windows: list[Window]) -> list[list[float]]:
        """Predicted activation of every token of every window."""


def pearson_abs(predicted: np.ndarray, actual: np.ndarray) -> float:
    """|Pearson r|, 0 when either side is constant (a description that predicts nothing)."""
    if len(predicted) < 2 or predicted.std() == 0 or actual.std() == 0:
        return 0.0
    return float(abs(np.corrcoef(predicted, actual)[0, 1]))


def simulation_score(simulator: Simulator, description: str, ex: FeatureExemplars) -> float:
    windows = ex.windows()
    predicted = np.array([a for w in simulator.predict(description, windows) for a in w], dtype=np.float64)
    actual = np.array([a for w in windows for a in w.acts], dtype=np.float64)
    if len(predicted) != len(actual):
        raise ValueError(f"simulator predicted {len(predicted)} activations for {len(actual)} tokens")
    return pearson_abs(predicted, actual)


class LexicalSimulator:
    def __init__(self, members: Optional[Callable[[str], frozenset]] = None):
        if members is None:
            from ..sources.wordnet import category_members

            members = lambda category: category_members().get(category, frozenset())  # noqa: E731
        self.members = members

    def predict(self, description: str, windows: list[Window]) -> list[list[float]]:
        quoted = {word_of(q) for q in _QUOTED.findall(description)} - {""}
        category = frozenset().union(*(self.members(c) for c in _CATEGORY.findall(description)))
        return [[1.0 if word_of(t) in quoted else 0.5 if word_of(t) in category else 0.0 for t in w.tokens]
                for w in windows]


_SIMULATE_PROMPT = """A feature of a language model fires on some tokens. Its description: "{description}".
Below are texts split into numbered tokens. For every token, predict how strongly the feature fires,
from 0 (not at all) to 10 (maximally). Answer with one line per token, "index<TAB>value", nothing else.

{tokens}"""
_LINE = re.compile(r"^\s*(\d+)\s*[\t:,= ]\s*(\d+(?:\.\d+)?)")


class LLMSimulator:
    def __init__(self, endpoint: ChatClient):
        self.endpoint = endpoint

    def predict(self, description: str, windows: list[Window]) -> list[list[float]]:
        flat = [t for w in windows for t in w.tokens]
        listing = "\n".join(f"{i}\t{t!r}" for i, t in enumerate(flat))
        reply = self.endpoint.complete([{"role": "user", "content": _SIMULATE_PROMPT.format(
            description=description, tokens=listing)}], max_tokens=8 * len(flat) + 16)
        values = [0.0] * len(flat)
        for line in reply.splitlines():
            m = _LINE.match(line)
            if m and int(m.group(1)) < len(flat):
                values[int(m.group(1))] = float(m.group(2))
        out, i = [], 0
        for w in windows:
            out.append(values[i:i + len(w.tokens)])
            i += len(w.tokens)
        return out


def make_simulator(name: str, endpoint: Optional[EndpointConfig] = None) -> Simulator:
    return build(SIMULATORS, name, "simulator", endpoint)


SIMULATORS: dict[str, Callable[[Optional[EndpointConfig]], Simulator]] = {
    "lexical": lambda endpoint: LexicalSimulator(),
    "llm": lambda endpoint: LLMSimulator(client_for(endpoint, "the llm simulator")),
}
"""Simulator name -> factory(endpoint config or None)."""
