"""Residual-stream activations of a target over a corpus: the data SAEs are trained on and exemplars
are mined from.

The first position of every text is dropped, as are the tokenizer's special tokens: the first
position is an attention sink whose residual norm is 50-100x the others' (SmolLM2 layer 15: 22,680
vs about 180; Gemma-3-270M: 83,038 vs about 6,000), which an SAE would spend its features on.

A shard on disk is a folder with one .npy file per layer, written batch by batch into preallocated
memory-mapped files and read back memory-mapped: neither side ever holds a shard's every layer (2,000
texts of 64 tokens at 31 layers of d=4096 is 65 GB in fp32).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from ..errors import ConfigError
from ..patching import clean_runs

TOKENS_FILE = "tokens.json"


@dataclass
class ActivationBatch:
    """Activations of a run of texts, tokens concatenated.

    tokens[i] is the readable string of token i, text_of[i] the index (into the texts given) of the
    text it belongs to; acts[layer] is [N_tokens, d] (float32; memory-mapped when loaded from disk)."""

    tokens: list[str]
    text_of: np.ndarray  # [N] int
    acts: Mapping[int, np.ndarray]

    @classmethod
    def load(cls, folder) -> "ActivationBatch":
        """A shard folder, every layer memory-mapped (pages are read as they are touched)."""
        folder = Path(folder)
        meta = json.loads((folder / TOKENS_FILE).read_text())
        acts = {int(l): np.load(folder / f"layer_{l}.npy", mmap_mode="r") for l in meta["layers"]}
        return cls(meta["tokens"], np.asarray(meta["text_of"], dtype=np.int64), acts)

    @staticmethod
    def layers_in(folder) -> list[int]:
        return [int(l) for l in json.loads((Path(folder) / TOKENS_FILE).read_text())["layers"]]


def readable_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (leading spaces kept: ' cat', not 'Ġcat')."""
    return [tokenizer.decode([i]) for i in ids]


def _kept_ids(tokenizer, texts: list[str], max_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token ids of each text (cut to max_tokens) and the mask of positions kept (no sink, no specials)."""
    special = set(tokenizer.all_special_ids)
    ids, keeps = [], []
    for text in texts:
        x = torch.tensor(tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"])
        keep = torch.tensor([int(t) not in special for t in x])
        keep[0] = False  # the attention sink (see the module docstring)
        ids.append(x)
        keeps.append(keep)
    return ids, keeps


def _check_layers(model, layers: list[int]) -> None:
    n_layers = model.config.num_hidden_layers
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the target has {n_layers} layers (0..{n_layers - 1})")


def _batches(model, ids: list[torch.Tensor], keeps: list[torch.Tensor], layers: list[int],
             batch_size: int) -> Iterator[dict[int, np.ndarray]]:
    """Per batch of texts: layer -> kept activations [n_kept, d] (float32, host memory)."""
    for start in range(0, len(ids), batch_size):
        runs = clean_runs(model, ids[start:start + batch_size])
        kept = [keep.to(run.states.device) for keep, run in zip(keeps[start:start + batch_size], runs)]
        # states[l + 1]: after layer l; one copy to the host per layer and batch
        yield {l: torch.cat([run.states[l + 1][k] for run, k in zip(runs, kept)]).float().cpu().numpy() for l in layers}


def corpus_activations(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16,
                       max_tokens: int = 64) -> ActivationBatch:
    """The residual stream after each of `layers` at every kept token of every text, in memory (small
    sets; write_activations streams a shard to disk)."""
    _check_layers(model, layers)
    ids, keeps = _kept_ids(tokenizer, texts, max_tokens)
    parts = list(_batches(model, ids, keeps, layers, batch_size))
    d = model.config.hidden_size
    acts = {l: np.concatenate([p[l] for p in parts]) if parts else np.zeros((0, d), np.float32) for l in layers}
    return ActivationBatch(*_token_index(tokenizer, ids, keeps), acts)


def _token_index(tokenizer, ids: list[torch.Tensor], keeps: list[torch.Tensor]) -> tuple[list[str], np.ndarray]:
    tokens = [t for x, keep in zip(ids, keeps) for t in readable_tokens(tokenizer, x[keep].tolist())]
    text_of = np.concatenate([np.full(int(keep.sum()), i, dtype=np.int64) for i, keep in enumerate(keeps)]) \
        if keeps else np.zeros(0, np.int64)
    return tokens, text_of


def write_activations(model, tokenizer, texts: list[str], layers: list[int], folder: Path, batch_size: int = 16,
                      max_tokens: int = 64) -> int:
    """corpus_activations streamed into a shard folder (atomically: a temporary folder renamed when
    complete); memory is one batch of hidden states. Returns the token count."""
    _check_layers(model, layers)
    ids, keeps = _kept_ids(tokenizer, texts, max_tokens)
    tokens, text_of = _token_index(tokenizer, ids, keeps)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d = model.config.hidden_size
    files = {l: np.lib.format.open_memmap(tmp / f"layer_{l}.npy", mode="w+", dtype=np.float32, shape=(len(tokens), d))
             for l in layers}
    row = 0
    for part in _batches(model, ids, keeps, layers, batch_size):
        n = len(part[layers[0]])
        for l in layers:
            files[l][row:row + n] = part[l]
        row += n
    for f in files.values():
        f.flush()
    del files
    (tmp / TOKENS_FILE).write_text(json.dumps({"layers": layers, "tokens": tokens, "text_of": text_of.tolist()}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return len(tokens)
