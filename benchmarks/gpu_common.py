"""What the GPU check's stages share: the sizes they run at, what a stage returns, the run's state, and
the counts and inputs several stages use."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["France", "Spain", "Japan", "Peru", "Egypt", "Canada", "Norway", "Chile", "Kenya", "Italy", "Nepal", "Cuba"]
TEMPLATES = ["The capital of {} is", "The official language of {} is"]


@dataclass
class Size:
    target: str  # its embedding has more rows than its tokenizer: the ZeRO-3 vocabulary case
    cross: str  # another family and width: the cross-explainer and the lstsq fit
    pairs: int  # counterfactual pairs patched
    train_steps: int
    lr: float
    fit_texts: int
    corpus_texts: int
    d_sae: int
    sae_k: int
    sae_steps: int
    explain: int  # held-out records explained


SIZES = {
    # random:smollm2 has 49,152 embedding rows for its 262-entry byte tokenizer
    "real": Size("random:smollm2-135m-instruct", "random:gemma-3-270m", pairs=8, train_steps=30, lr=1e-4,
                 fit_texts=300, corpus_texts=1500, d_sae=16384, sae_k=32, sae_steps=600, explain=128),
    "tiny": Size("tiny-llama:hidden=64,layers=4,kv_heads=2,vocab=320", "tiny-gemma:hidden=48,layers=4", pairs=4,
                 train_steps=8, lr=3e-3, fit_texts=80, corpus_texts=120, d_sae=64, sae_k=4, sae_steps=40, explain=16),
}


@dataclass
class Outcome:
    ok: bool
    seconds: float
    tokens: int = 0
    flops: float = 0.0
    details: Optional[dict] = None


class Skipped(Exception):
    """A stage that cannot run on this machine (the message says why); reported SKIP, not a failure."""


@dataclass
class Check:
    """The shared state of one run: device, dtypes, scratch folder, and what each stage left."""

    device: str
    size: Size
    work: Path
    peak: Optional[float]
    deadline: float = float("inf")  # time.monotonic() by which the running stage must end
    records: list = field(default_factory=list)
    export: Optional[Path] = None
    projection: object = None  # the lstsq stage's Pi (target -> cross)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"  # bf16 is ~2x slower than fp32 on CPUs

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    @property
    def held_out(self) -> list:
        """The test records explainers are asked about."""
        return [r for r in self.records if r.split == "test"][:self.size.explain]

    def seconds_left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def run_module(self, module: str, *args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """`python -m module args` from the repository, on this check's device, within the stage's time."""
        from selfexplain.training.step import without_rendezvous

        full = {**without_rendezvous(dict(os.environ)),
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
        if self.device == "cpu":
            full["CUDA_VISIBLE_DEVICES"] = ""  # the rank picks its device by what it sees
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full, capture_output=True,
                              text=True, timeout=self.seconds_left())


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def body_params(spec) -> int:
    """A spec's parameters less its input embedding (a lookup, no FLOPs), counted on the meta device (no
    memory, no weights). Where the LM head is untied it is left out too: a forward that only needs
    hidden states computes it at one position per prompt at most."""
    import torch

    from selfexplain.groundtruth.models import KEEP, load_model

    with torch.device("meta"):
        model = load_model(spec, KEEP)[0]
    head = model.get_output_embeddings()
    skip = {id(model.get_input_embeddings().weight)} | ({id(head.weight)} if head is not None else set())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def facts_pairs(n: int):
    """Counterfactual pairs from made-up facts (no countryinfo on a bare GPU machine)."""
    from selfexplain.groundtruth.fact_pairs import PatchItem
    from selfexplain.groundtruth.sources.facts import Fact, FactPair

    pairs = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        a, b = SUBJECTS[i % len(SUBJECTS)], SUBJECTS[(i + 5) % len(SUBJECTS)]
        x, xp = Fact(a, f"r{i % 2}", template, f"A{i}"), Fact(b, f"r{i % 2}", template, f"B{i}")
        pairs.append(PatchItem(f"{a}-{i}", FactPair(x, xp, (x.answer, xp.answer))))
    return pairs
