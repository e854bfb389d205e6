"""What every benchmark shares: where it runs (Setting: device, weights, timing, result files), model
FLOP counts, the inputs several benchmarks build (explainer questions, training records and batches),
and the recipe whose training settings they run."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.gpu_check import peak_flops
from selfexplain.groundtruth.ablation import AblationConfig, build_items
from selfexplain.groundtruth.models import RANDOM_INIT_PREFIX, ModelSpec, load_model
from selfexplain.groundtruth.records import Record

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = 3


@dataclass
class Setting:
    """Where the benchmarks run: the device, and whether packaged weights are at hand."""

    device: str = "cpu"
    random_weights: bool = False
    _peak: Optional[float] = None

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"  # bf16 was measured ~2x slower on these CPUs

    @property
    def results(self) -> Path:
        return RESULTS / "gpu" if self.device == "cuda" else RESULTS

    def spec(self, name: str) -> ModelSpec:
        return ModelSpec((RANDOM_INIT_PREFIX if self.random_weights else "") + name, self.dtype)

    def load(self, name: str, dtype: Optional[str] = None):
        """(model, tokenizer) on the device, in `dtype` (default: the device's)."""
        spec = self.spec(name)
        return load_model(ModelSpec(spec.source, dtype or spec.dtype), self.device)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def timed(self, fn: Callable[[], object], repeats: int = REPEATS, warmup: bool = True) -> tuple[float, object]:
        """Median seconds of fn() over `repeats` runs after one warm-up (none for a workload of minutes,
        where loading is a rounding error), and its last result."""
        return self.timed_together({"run": fn}, repeats, warmup)["run"]

    def timed_together(self, fns: dict[str, Callable[[], object]], repeats: int = REPEATS,
                       warmup: bool = True) -> dict[str, tuple]:
        """{name: (median seconds over `repeats` runs after one warm-up, last result)} for several ways of one
        workload, their runs taken in turn, so that a slower or faster spell of the machine falls on each alike."""
        results = {name: fn() for name, fn in fns.items()} if warmup else {}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                self.sync()
                start = time.perf_counter()
                results[name] = fn()
                self.sync()
                times[name].append(time.perf_counter() - start)
        return {name: (statistics.median(times[name]), results[name]) for name in fns}

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak(self) -> Optional[float]:
        """FLOP/s the utilisation is measured against (benchmarks.gpu_check.peak_flops), measured once."""
        if self._peak is None:
            self._peak = peak_flops(self.device, None)[0]
        return self._peak

    def write(self, name: str, fast: float, naive: float, target: float, workload: dict,
              model_flops: Optional[float] = None, **extra) -> dict:
        out = {"name": name, "fast": round(fast, 4), "naive": round(naive, 4), "ratio": round(naive / fast, 3),
               "target": target, "meets_target": naive / fast >= target, "workload": workload, "device": self.device_name(),
               "dtype": self.dtype, "weights": "random" if self.random_weights else "packaged",
               "torch_threads": torch.get_num_threads(), **extra}
        if model_flops is not None and self.peak():
            out.update(model_flops=model_flops, peak_flops_per_second=round(self.peak()),
                       model_flop_utilisation=round(model_flops / (fast * self.peak()), 4))
        return self._save(out)

    def skip(self, name: str, why: str) -> dict:
        return self._save({"name": name, "skipped": why, "device": self.device_name()})

    def _save(self, out: dict) -> dict:
        self.results.mkdir(parents=True, exist_ok=True)
        (self.results / f"{out['name']}.json").write_text(json.dumps(out, indent=1))
        print(json.dumps(out))
        return out

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device == "cuda" else "cpu"


def weights_past_embedding(model) -> int:
    """Parameters a token's forward multiplies by: all but the input embedding (a lookup). A head tied to
    the embedding is left out with it."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def generation_flops(model, prompt_tokens: int, new_tokens: int) -> float:
    """Model FLOPs of generating: every weight but the embedding once per token, the LM head once per
    generated token (a prompt's forward computes logits at its last position only)."""
    head = model.config.get_text_config().hidden_size * model.config.get_text_config().vocab_size
    return 2.0 * weights_past_embedding(model) * (prompt_tokens + new_tokens) + 2.0 * head * new_tokens


def training_flops(model, tokens: int) -> float:
    """The usual 6 x parameters x tokens of a forward and backward, the input embedding left out."""
    return 6.0 * weights_past_embedding(model) * tokens


def explain_records(n: int) -> list[Record]:
    """n explainer questions about real ablation inputs (gold fields left empty)."""
    cfg = AblationConfig(max_sources=n)
    items = build_items(cfg, seed=1)[:n]
    return [Record(f"r{i}", "input_ablation", "t", "test", it.source_id, it.full, it.question, "", False, "", "")
            for i, it in enumerate(items)]


def train_records(n: int) -> list[Record]:
    """n input-ablation training records: real prompts, explanations of both kinds."""
    from selfexplain.groundtruth.explanations import format_explanation

    records = explain_records(n)
    for i, r in enumerate(records):
        r.explanation = format_explanation(i % 2 == 0, "Paris")
    return records


def train_batch(tok, n: int = 8):
    from selfexplain.training.batches import collate, encode_example

    return collate([encode_example(tok, r, "plain", 256) for r in train_records(n)], tok.pad_token_id)


RECIPE = {"cpu": "configs/quickstart.yaml", "cuda": "configs/study_gpu.yaml"}
"""The recipe whose training settings a device's training benchmarks run."""


def recipe_zero_stage(s: Setting) -> int:
    from selfexplain.distributed.config import load_config

    return load_config(str(Path(__file__).resolve().parents[1] / RECIPE[s.device])).train.zero_stage
