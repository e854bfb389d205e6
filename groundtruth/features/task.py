"""Task A, feature descriptions: records pairing an SAE feature's decoder direction (the vector the
explainer reads) with its best description (the label).

The pieces run in this order, as the steps of recipe.py (registered in spec.py): corpus texts -> residual activations at the
configured layers -> one SAE per layer (trained here or pretrained) -> exemplars per feature ->
candidate descriptions, the best by simulation score -> records, with whole features held out per layer
for test -> the out-of-distribution sets of the test features.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np

from ..errors import ConfigError
from ..records import Record, safe_key
from ..sources.corpus import load_passages
from .describers import DESCRIBERS, Describer, DescriberSettings, best_description, describe_features
from .endpoint import EndpointConfig
from .exemplars import FeatureExemplars
from .neuronpedia import load_neuronpedia
from .sae import SAEConfig
from .simulators import SIMULATORS, Simulator, make_simulator

TASK = "feature_descriptions"
OOD_SPLITS = ("act", "dact")  # out-of-distribution test sets (see ood.py)


@dataclass
class FeatureConfig:
    """Task A: describe what activates an SAE feature of the target."""

    layers: Optional[list[int]] = None
    """Target layers with SAEs (the residual stream after each). Null: use `depths`."""
    depths: list[float] = field(default_factory=lambda: [0.5])
    """Layers as fractions of the target's depth (layer = int(depth x layers)), for runs whose targets
    differ in depth; ignored when `layers` is set."""
    corpus: list[str] = field(default_factory=lambda: ["wordnet", "fortunes"])
    """Corpora the activations come from (see groundtruth/sources/corpus.py)."""
    corpus_texts: int = 2000
    """Texts drawn from the corpus."""
    max_tokens: int = 48
    """Tokens per text (longer texts are cut)."""
    texts_per_shard: int = 200
    """Texts per activation shard: the unit of work of the actor pool."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    top_k: int = 10
    """Top-activating texts kept per feature (the paper simulates on the top 20)."""
    negatives: int = 10
    """Random texts per feature the simulation is also scored on."""
    mine_chunk_tokens: int = 4096
    """Tokens whose SAE codes exist at once while mining exemplars: [chunk, d_sae] fp32 on the device
    (4,096 x 131,072 features = 2 GB)."""
    min_exemplars: int = 5
    """Features firing in fewer texts are not described (too rare to say anything about)."""
    describers: list[str] = field(default_factory=lambda: ["top_tokens", "wordnet"])
    """Describers whose candidates compete per feature (see groundtruth/features/describers.py)."""
    simulator: str = "lexical"
    """Simulator that picks the best candidate and scores generated descriptions."""
    eval_only_fields: ClassVar[tuple[str, ...]] = ("judge", "discriminative_k")
    judge: str = "embedding"
    """Judge of generated vs gold descriptions at eval (see eval/judges.py)."""
    discriminative_k: int = 9
    """Eval: a generated description is simulated on its feature's exemplars and on this many other test
    features' exemplars; top1 is how often its own rank first (chance 1/(K+1))."""
    endpoint: Optional[EndpointConfig] = None
    """OpenAI-compatible endpoint for the llm describer, simulator and judge."""
    neuronpedia: Optional[str] = None
    """A Neuronpedia explanations export (JSON / JSON lines) for the neuronpedia describer."""
    max_features_per_layer: Optional[int] = None
    """Describe at most this many features per layer, drawn at random from those firing often enough
    (null: all; with 131k-feature SAEs and an LLM describer this is the budget)."""
    min_simulation: float = 0.0
    """Features whose best description scores below this are left out."""
    test_features_per_layer: int = 50
    """Whole features held out per layer for test (the paper: 50)."""
    max_train_features_per_layer: Optional[int] = None
    """Cap on train features per layer (null: all that remain)."""

    def check(self) -> None:
        self.sae.check()
        if self.discriminative_k < 1:
            raise ValueError(f"discriminative_k: must be at least 1, got {self.discriminative_k}")
        for name in self.describers:
            if name not in DESCRIBERS:
                raise ValueError(f"describers: unknown {name!r} (known: {', '.join(DESCRIBERS)})")
        if self.simulator not in SIMULATORS:
            raise ValueError(f"simulator: unknown {self.simulator!r} (known: {', '.join(SIMULATORS)})")
        uses_llm = "llm" in self.describers or self.simulator == "llm" or self.judge == "llm"
        if uses_llm and self.endpoint is None:
            raise ValueError("endpoint: the llm describer, simulator or judge needs endpoint.url and endpoint.model")
        if "neuronpedia" in self.describers and not self.neuronpedia:
            raise ValueError("neuronpedia: the neuronpedia describer needs the path of an explanations export")
        if any(not 0 <= d < 1 for d in self.depths):
            raise ValueError(f"depths: fractions in [0, 1), got {self.depths}")
        if self.min_exemplars > self.top_k:
            raise ValueError(f"min_exemplars ({self.min_exemplars}) cannot exceed top_k ({self.top_k})")


def target_layers(cfg: FeatureConfig, num_layers: int) -> list[int]:
    """The target's SAE layers."""
    layers = cfg.layers if cfg.layers is not None else sorted({int(d * num_layers) for d in cfg.depths})
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the target has {num_layers} layers")
    return list(layers)


def corpus_texts(cfg: FeatureConfig, seed: int) -> list[str]:
    return load_passages(cfg.corpus, cfg.corpus_texts, seed)


def check_inputs(cfg: FeatureConfig, seed: int) -> None:
    """The corpus and, where a describer reads it, the Neuronpedia export: each exists and parses."""
    corpus_texts(cfg, seed)
    if cfg.neuronpedia:
        load_neuronpedia(cfg.neuronpedia)


def make_describers(cfg: FeatureConfig) -> dict[str, Describer]:
    settings = DescriberSettings(endpoint=cfg.endpoint,
                                 neuronpedia=load_neuronpedia(cfg.neuronpedia) if cfg.neuronpedia else None)
    return {name: DESCRIBERS[name](settings) for name in cfg.describers}


def feature_records(exemplars: dict[int, FeatureExemplars], directions: np.ndarray, layer: int, target: str,
                    cfg: FeatureConfig, describers: dict[str, Describer], simulator: Simulator) -> list[Record]:
    """One raw record per describable feature of one layer: v = its decoder direction [d], the label
    its best description; the exemplars ride along in the query (eval simulates on them)."""
    records = []
    eligible = [f for f in sorted(exemplars) if len(exemplars[f].top) >= cfg.min_exemplars]
    if cfg.max_features_per_layer is not None and len(eligible) > cfg.max_features_per_layer:
        eligible = sorted(random.Random(f"features:{layer}").sample(eligible, cfg.max_features_per_layer))
    candidates = describe_features([exemplars[f] for f in eligible], describers)
    for f, texts in zip(eligible, candidates):
        ex = exemplars[f]
        best = best_description(ex, texts, simulator)
        if best is None or best[2] < cfg.min_simulation:
            continue
        description, describer, score, candidates = best
        records.append(Record(
            record_id=safe_key(TASK, target, f"L{layer}", f"F{f}"), task=TASK, target=target, split="raw",
            source_id=f"L{layer}-F{f}", prompt="", question="", explanation=description, changed=False,
            output_before="", output_after="", layers=[layer], vector=directions[f].astype(np.float32),
            query={"layer": layer, "feature": f, "describer": describer, "simulation": score,
                   "candidates": candidates, "frequency": round(ex.frequency, 6), "exemplars": ex.to_json()}))
    return records


def split_features(records: list[Record], cfg: FeatureConfig, seed: int) -> tuple[list[Record], list[Record]]:
    """Per layer, test_features_per_layer features at random for test, the rest (capped) for train;
    no feature is in both."""
    by_layer: dict[int, list[Record]] = {}
    for r in records:
        by_layer.setdefault(r.layers[0], []).append(r)
    train, test = [], []
    for layer in sorted(by_layer):
        rows = sorted(by_layer[layer], key=lambda r: r.record_id)
        random.Random(f"{seed}:{layer}").shuffle(rows)
        n_test = min(cfg.test_features_per_layer, len(rows) // 2)  # never leave train empty
        held, rest = rows[:n_test], rows[n_test:]
        test += held
        train += rest[:cfg.max_train_features_per_layer] if cfg.max_train_features_per_layer else rest
    for r in train:
        r.split = "train"
    for r in test:
        r.split = "test"
    return train, test


def description_stats(records: list[Record]) -> dict:
    """Label statistics of a set of feature records: describers chosen, simulation scores, repeats."""
    if not records:
        return {"count": 0}
    sims = [r.query["simulation"] for r in records]
    labels = Counter(r.explanation for r in records)
    return {"count": len(records), "describers": dict(Counter(r.query["describer"] for r in records)),
            "mean_simulation": round(float(np.mean(sims)), 4), "distinct_labels": len(labels),
            "top_labels": labels.most_common(5),
            "layers": dict(Counter(str(r.layers[0]) for r in records)),
            "examples": [feature_example(r) for r in records[:3]]}


def feature_example(record: Record) -> dict:
    """A feature as a person reads it: its label and its strongest exemplar with the peak marked."""
    top = FeatureExemplars.from_json(record.query["exemplars"]).top[0]
    at = top.acts.index(top.peak)
    text = "".join(top.tokens[:at]) + "[[" + top.tokens[at] + "]]" + "".join(top.tokens[at + 1:])
    return {"feature": record.source_id, "description": record.explanation, "simulation": record.query["simulation"],
            "exemplar": text.replace("\n", " ")}


def simulator_of(cfg: FeatureConfig) -> Simulator:
    return make_simulator(cfg.simulator, cfg.endpoint)


def stats_lines(stats: dict) -> list[str]:
    """Report lines of the feature task's label_stats.json: each SAE, each split's descriptions, and the
    test features' examples."""
    lines = []
    for layer, m in stats["sae"].items():
        lines.append(f"- SAE layer {layer} ({m['source']}): {m['d_sae']} features, L0 {m['l0']:.1f}, explained variance "
                     f"{m['explained_variance']:.3f}, dead fraction {m['dead_fraction']:.3f} over {m['tokens']} tokens")
    for split in ("raw", "train", "test", "act", "dact"):
        s = stats.get(split, {})
        if s.get("count"):
            top = ", ".join(f"{t!r} x{c}" for t, c in s["top_labels"][:3])
            lines.append(f"- {split}: {s['count']} features, describers chosen {s['describers']}, mean simulation "
                         f"score of the gold labels {s['mean_simulation']:.3f}, {s['distinct_labels']} distinct labels; "
                         f"most repeated: {top}")
    for ex in stats.get("test", {}).get("examples", []):
        lines.append(f"- test feature {ex['feature']}: {ex['description']!r} (simulation {ex['simulation']:.2f}); "
                     f"strongest exemplar: {ex['exemplar']!r}")
    return lines
