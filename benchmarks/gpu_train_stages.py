"""The GPU check's training stages: DeepSpeed jobs through `python -m selfexplain.training.step JOB.json` (one rank,
bf16), as torchrun and SLURM run them: full fine-tunes under ZeRO-2 and ZeRO-3 (the target's spare
embedding rows must survive), LoRA under ZeRO-2 and ZeRO-3 killed after a checkpoint and resumed to the
same losses, and a cross-explainer reading v through the lstsq Pi, trained and evaluated."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .gpu_common import Check, Outcome, params
from .gpu_stages import explain_held_out, load_export


def _job(c: Check, name: str, explainer: str, **train):
    from selfexplain.groundtruth.models import ModelSpec
    from selfexplain.groundtruth.records import write_split
    from selfexplain.training.job import TrainConfig, TrainJob

    data = c.work / "records" / "train"
    if not data.exists():
        write_split(data, [r for r in c.records if r.split == "train"], "gpu-check", shard_size=1000)
    settings = {"micro_batch_size": 8, "max_steps": c.size.train_steps, "lr": c.size.lr, "precision": "bf16",
                "use_ray": False, "checkpoint_every": 10**6, "log_every": max(1, c.size.train_steps // 6),
                "max_seq_len": 256, "prompt_format": "plain", **train}
    role = "t" if explainer == c.size.target else "x"  # the same name as the target's: a self-explainer (no Pi)
    return TrainJob("activation_patching", "t", role, ModelSpec(explainer, c.dtype), str(data), str(c.work / name),
                    TrainConfig(**settings), target_spec=ModelSpec(c.size.target, c.dtype))


def _run(c: Check, job, env: Optional[dict] = None, expect_ok: bool = True):
    path = Path(job.out_dir).with_suffix(".json")
    path.write_text(job.to_json())
    done = c.run_module("selfexplain.training.step", str(path), env=env)
    if expect_ok and done.returncode != 0:
        raise RuntimeError(f"python -m selfexplain.training.step exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _log(job) -> list[dict]:
    return [json.loads(line) for line in job.train_log.read_text().splitlines()]


def _trained(c: Check, job, seconds: float, explainer: tuple, lora: bool = False, passed: bool = True,
             **details) -> Outcome:
    """The outcome of a finished job whose export loaded as `explainer` (load_export): the loss must fall,
    the stage's own check pass, and the embedding keep every row of the base model (ZeRO-3 partitions it
    to shape [0]; a model with more rows than its tokenizer has must not be cut to the tokenizer)."""
    from selfexplain.training.batches import encode_example

    log = _log(job)
    model, tok, projection = explainer
    rows = [_embedding_rows(job.explainer_spec), model.get_input_embeddings().num_embeddings]
    records = job.records()
    per_step = job.train.micro_batch_size * sum(len(encode_example(tok, r, "plain", 256).ids) for r in records) / len(records)
    tokens = int(per_step * (log[-1]["step"] - (details.get("resumed_at") or 0)))
    ok = log[-1]["loss"] < log[0]["loss"] and passed and rows[1] == max(rows[0], len(tok))
    return Outcome(ok, log[-1]["seconds"], tokens, (4.0 if lora else 6.0) * params(model) * tokens, {
        "loss": [round(log[0]["loss"], 3), round(log[-1]["loss"], 3)], "steps": log[-1]["step"],
        "process_seconds": round(seconds, 1), "export_loads": True, "projection": projection.kind if projection else None,
        "embedding_rows": rows, **details})


def _embedding_rows(spec) -> int:
    """A spec's embedding rows, from a model built on the meta device (no memory, no weights)."""
    import torch

    from selfexplain.groundtruth.models import KEEP, load_model

    with torch.device("meta"):
        return load_model(spec, KEEP)[0].get_input_embeddings().num_embeddings


def train_full(c: Check, stage: int) -> Outcome:
    """A full fine-tune of the target explaining itself; under ZeRO-3 its partitioned embedding reads as
    shape [0], and its spare rows (more than its tokenizer has) must come back from the export."""
    job = _job(c, f"zero{stage}", c.size.target, zero_stage=stage)
    start = time.perf_counter()
    _run(c, job)
    seconds = time.perf_counter() - start
    c.export = job.export_dir
    return _trained(c, job, seconds, load_export(job.export_dir, c.device))


def lora_resumed(c: Check, stage: int) -> Outcome:
    """LoRA killed right after step `crash` (a hard exit, as a lost node), with a checkpoint at `every`;
    the rerun resumes there and must log the same losses for the steps both runs took."""
    from selfexplain.training.lora import LoraConfig
    from selfexplain.training.preemption import TRAIN_FAULT_ENV

    steps = c.size.train_steps
    every, crash = max(1, steps // 3), max(1, steps // 3) + 2
    job = _job(c, f"lora{stage}", c.size.target, zero_stage=stage, lora=LoraConfig(r=8, alpha=16),
               train_embeddings=False, checkpoint_every=every, log_every=1)
    start = time.perf_counter()
    killed = _run(c, job, env={TRAIN_FAULT_ENV: f"0:{crash}:{c.work / f'lora{stage}.crashed'}"}, expect_ok=False)
    if killed.returncode == 0 or job.export_dir.exists():
        raise RuntimeError(f"the job was to be killed after step {crash}; it exited {killed.returncode}")
    before = {e["step"]: e["loss"] for e in _log(job)}
    _run(c, job)
    seconds = time.perf_counter() - start
    after = {e["step"]: e["loss"] for e in _log(job)}
    again = sorted(set(before) & set(after) - set(range(every + 1)))  # the steps after the checkpoint
    worst = max((abs(after[s] - before[s]) / abs(before[s]) for s in again), default=float("inf"))
    return _trained(c, job, seconds, load_export(job.export_dir, c.device), lora=True, passed=bool(again) and worst < 1e-2,
                    resumed_at=every, steps_redone=again, max_relative_loss_difference=round(worst, 5))


def train_cross(c: Check) -> Outcome:
    """The explainer of another family and width (ZeRO-2) reads the target's v through the lstsq stage's
    Pi; trained, then evaluated on held-out records (causal metrics)."""
    from selfexplain.eval.metrics import score
    from selfexplain.training.projection import ProjectionConfig
    from selfexplain.training.projection import save_projection
    from selfexplain.training.vectors import vector_keys

    job = _job(c, "cross", c.size.cross, zero_stage=2, train_embeddings=False,
               projection=ProjectionConfig(cross_kind="lstsq"))
    save_projection(c.projection.subset(vector_keys(job.records())), job.projection_init_path)  # the ranks load it
    start = time.perf_counter()
    _run(c, job)
    seconds = time.perf_counter() - start
    explainer = load_export(job.export_dir, c.device)
    evaluated, answers = explain_held_out(c, explainer)
    metrics = score(answers, c.held_out)
    return _trained(c, job, seconds, explainer, passed=evaluated.ok, explained=len(answers),
                    exact_match=[round(metrics[k], 3) for k in ("exact_match", "exact_match_lo", "exact_match_hi")],
                    parse_rate=round(metrics["parse_rate"], 3), projection_on=evaluated.details["projection"])
