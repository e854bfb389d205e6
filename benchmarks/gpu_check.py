"""GPU check: every domain stage in one process on one device, with time, tokens/s and model FLOP
utilisation, on random-init models of the real shapes (no weights to download) or tiny ones.

    python -m benchmarks.gpu_check                          # the GPU, SmolLM2-135M / Gemma-3-270M shapes
    python -m benchmarks.gpu_check --device cpu --size tiny # a couple of minutes on a laptop
    make gpu-check                                          # the first, results in benchmarks/results/gpu/

Stages, in order (each feeds the next, as the pipeline does):
  patching    the fast patcher against one hooked forward per intervention (labels must agree wherever
              the reference's decision is not a near-tie), then the ground-truth records of the pairs
  lstsq       Pi fitted between the target and a model of another family, on the device
  train_zero2 / train_zero3
              a DeepSpeed job through `python -m training.step JOB.json` (one rank, bf16) on those
              records: the loss must fall and the export must load back
  generation  the exported explainer explains held-out records with v injected (batched, KV cache)
  sae         activations written to a shard, a TopK SAE trained, exemplars mined in chunks
Beyond torch and transformers it needs deepspeed and webdataset (training) and sae-lens (sae); a
stage whose package is missing is reported SKIP and the check fails. `make gpu-wheels` builds the
wheels a GPU machine without them needs (benchmarks/gpu_wheels.sh lists them).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from training.allocator import tune_this_process

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 peak by GPU name (first match wins): what utilisation is measured against."""
NEEDS = {"train_zero2": ("deepspeed", "webdataset"), "train_zero3": ("deepspeed", "webdataset"),
         "generation": ("deepspeed", "webdataset"), "sae": ("sae_lens",)}
SUBJECTS = ["France", "Spain", "Japan", "Peru", "Egypt", "Canada", "Norway", "Chile", "Kenya", "Italy", "Nepal", "Cuba"]
TEMPLATES = ["The capital of {} is", "The official language of {} is"]


@dataclass
class Size:
    target: str
    cross: str
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
    "real": Size("random:smollm2-135m-instruct", "random:gemma-3-270m", pairs=8, train_steps=30, lr=1e-4,
                 fit_texts=300, corpus_texts=1500, d_sae=16384, sae_k=32, sae_steps=600, explain=128),
    "tiny": Size("tiny-llama:hidden=64,layers=4", "tiny-gemma:hidden=48,layers=4", pairs=4, train_steps=8, lr=3e-3,
                 fit_texts=80, corpus_texts=120, d_sae=64, sae_k=4, sae_steps=40, explain=16),
}


@dataclass
class Outcome:
    ok: bool
    seconds: float
    tokens: int = 0
    flops: float = 0.0
    details: Optional[dict] = None


class Check:
    """The shared state of one run: device, dtypes, scratch folder, and what each stage left."""

    def __init__(self, device: str, size: Size, work: Path, peak: Optional[float]):
        self.device, self.size, self.work, self.peak = device, size, work, peak
        self.dtype = "bfloat16" if device == "cuda" else "float32"  # bf16 is ~2x slower than fp32 on CPUs
        self.records: list = []
        self.export: Optional[Path] = None

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def body_params(spec) -> int:
    """A spec's parameters less its input embedding (a lookup, no FLOPs), counted on the meta device (no
    memory, no weights). Where the LM head is untied it is left out too: a forward that only needs
    hidden states computes it at one position per prompt at most."""
    import torch

    from groundtruth.models import KEEP, load_model

    with torch.device("meta"):
        model = load_model(spec, KEEP)[0]
    head = model.get_output_embeddings()
    skip = {id(model.get_input_embeddings().weight)} | ({id(head.weight)} if head is not None else set())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def facts_pairs(n: int):
    """Counterfactual pairs from made-up facts (no countryinfo on a bare GPU machine)."""
    from groundtruth.patching_task import PatchItem
    from groundtruth.sources.facts import Fact, FactPair

    pairs = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        a, b = SUBJECTS[i % len(SUBJECTS)], SUBJECTS[(i + 5) % len(SUBJECTS)]
        x, xp = Fact(a, f"r{i % 2}", template, f"A{i}"), Fact(b, f"r{i % 2}", template, f"B{i}")
        pairs.append(PatchItem(f"{a}-{i}", FactPair(x, xp, (x.answer, xp.answer))))
    return pairs


# ---------------------------------------------------------------- stages
def stage_patching(c: Check) -> Outcome:
    """Fast vs hooked patcher in fp32 (decisions compared in fp32, as ground truth makes them)."""
    from groundtruth.models import ModelSpec, load_model
    from groundtruth.patching import Intervention, decided_tokens, decoder_layers, layer_blocks, patch_fast, patch_slow
    from groundtruth.patching_task import PatchingConfig, align, encode_side, run_patching

    model, tok = load_model(ModelSpec(c.size.target), c.device)
    cfg = PatchingConfig(num_blocks=4)
    items = facts_pairs(c.size.pairs)
    n_layers = len(decoder_layers(model))
    blocks = layer_blocks(n_layers, 4)
    per_layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    head = model.config.hidden_size * model.config.vocab_size
    agree = near_ties = decisions = changed = tokens = 0
    flops = fast_s = slow_s = 0.0
    for item in items:
        x, xp = encode_side(tok, cfg, item.pair, item.pair.x), encode_side(tok, cfg, item.pair, item.pair.x_prime)
        plan = [Intervention(b, t, align(t, x, xp)) for b in range(4) for t in range(len(x.ids))]
        c.sync()
        start = time.perf_counter()
        fast = patch_fast(model, x.ids, xp.ids, blocks, plan)
        c.sync()
        fast_s += time.perf_counter() - start
        start = time.perf_counter()
        slow = patch_slow(model, x.ids, xp.ids, blocks, plan)
        c.sync()
        slow_s += time.perf_counter() - start
        reference = [slow[0], *slow[1]]
        same = [a == b for a, b in zip(decided_tokens(fast)[1], decided_tokens(slow)[1])] + \
            [fast[0].token == slow[0].token]
        ties = [d.margin < 1e-3 for d in [*slow[1], slow[0]]]
        agree += sum(s or t for s, t in zip(same, ties))
        near_ties += sum(ties)
        decisions += len(reference)
        changed += sum(d.token != slow[0].token for d in slow[1])
        tokens += len(x.ids) * len(plan) + len(x.ids) + len(xp.ids)
        flops += 2 * 2 * len(x.ids) * n_layers * per_layer  # the clean runs of x and x'
        flops += sum(2 * len(x.ids) * (n_layers - blocks[iv.block][0]) * per_layer + 2 * head for iv in plan)
    c.records = run_patching(model, tok, items, cfg, "t", lambda s: "test" if s.endswith(("-0", "-1")) else "train")
    return Outcome(agree == decisions, fast_s, tokens, flops, {
        "model": c.size.target, "interventions": decisions - len(items), "labels_agree": f"{agree}/{decisions}",
        "near_ties_skipped": near_ties, "changed": changed, "speedup_vs_hooked": round(slow_s / fast_s, 2),
        "records": len(c.records), "on": str(next(model.parameters()).device)})


def stage_lstsq(c: Check) -> Outcome:
    from groundtruth.models import ModelSpec
    from training.explainer import ProjectionConfig
    from training.projection_fit import fit_projection
    from training.vectors import vector_keys

    corpus = c.work / "fit_corpus.txt"
    corpus.write_text("\n".join(f"{s} is a country; its capital and its language are known to many people {i}."
                                for i in range(c.size.fit_texts) for s in [SUBJECTS[i % len(SUBJECTS)]]))
    keys = vector_keys(c.records)
    cfg = ProjectionConfig(fit_corpus=str(corpus), fit_texts=c.size.fit_texts)
    target, explainer = ModelSpec(c.size.target, c.dtype), ModelSpec(c.size.cross, c.dtype)
    c.sync()
    start = time.perf_counter()
    projection = fit_projection(keys, target, explainer, cfg, seed=0, trainable=False, device=c.device)
    c.sync()
    seconds = time.perf_counter() - start
    n_params = body_params(target) + body_params(explainer)
    tokens = int(sum(e["tokens"] for e in projection.fit_error.values()) / len(keys) * 1.25)  # fit + held-out
    errors = {k: round(e["heldout"], 3) for k, e in projection.fit_error.items()}
    ok = all(0 <= e < 1.0 for e in errors.values())
    return Outcome(ok, seconds, tokens, 2.0 * n_params * tokens, {"keys": keys, "heldout_error": errors,
                                                                   "target": c.size.target, "explainer": c.size.cross})


def _train(c: Check, stage: int) -> Outcome:
    from groundtruth.models import ModelSpec
    from groundtruth.records import write_split
    from training.job import TrainConfig, TrainJob

    data = c.work / "records" / "train"
    if not data.exists():
        write_split(data, [r for r in c.records if r.split == "train"], "gpu-check", shard_size=1000)
    job = TrainJob("activation_patching", "t", "t", ModelSpec(c.size.target, c.dtype), str(data),
                   str(c.work / f"zero{stage}"), TrainConfig(
                       micro_batch_size=8, max_steps=c.size.train_steps, lr=c.size.lr, zero_stage=stage,
                       precision="bf16", use_ray=False, checkpoint_every=10**6, log_every=max(1, c.size.train_steps // 6),
                       max_seq_len=256, prompt_format="plain"), target_spec=ModelSpec(c.size.target, c.dtype))
    path = c.work / f"zero{stage}.json"
    path.write_text(job.to_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if c.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rank picks its device by what it sees
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "training.step", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"python -m training.step exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    log = [json.loads(line) for line in job.train_log.read_text().splitlines()]
    model, tok, projection = _load_export(job.export_dir, c.device)
    from training.batches import encode_example

    per_step = 8 * sum(len(encode_example(tok, r, "plain", 256).ids) for r in job.records()) / len(job.records())
    tokens = int(per_step * log[-1]["step"])
    loop = log[-1]["seconds"]  # the training loop alone (start-up, DeepSpeed init and export excluded)
    c.export = job.export_dir
    fell = log[-1]["loss"] < log[0]["loss"]
    return Outcome(fell, loop, tokens, 6.0 * params(model) * tokens, {
        "loss": [round(log[0]["loss"], 3), round(log[-1]["loss"], 3)], "steps": log[-1]["step"],
        "process_seconds": round(seconds, 1), "export_loads": True, "projection": projection is not None})


def _load_export(folder: Path, device: str):
    from training.export import load_explainer

    return load_explainer(folder, {"task": "activation_patching", "target": "t"}, device)


def stage_generation(c: Check) -> Outcome:
    from eval.generate import explain
    from groundtruth.models import model_device

    model, tok, projection = _load_export(c.export, c.device)
    held = [r for r in c.records if r.split == "test"][:c.size.explain]
    c.sync()
    start = time.perf_counter()
    answers = explain(model, tok, held, "plain", max_new_tokens=50, batch_size=32, projection=projection)
    c.sync()
    seconds = time.perf_counter() - start
    generated = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    from training.batches import encode_prompt

    prompt = sum(len(encode_prompt(tok, r, "plain")) for r in held)
    return Outcome(len(answers) == len(held) > 0, seconds, generated, 2.0 * params(model) * (generated + prompt), {
        "records": len(held), "generated_tokens": generated, "prompt_tokens": prompt, "on": str(model_device(model)),
        "projection_on": str(projection.maps[projection.keys[0]].weight.device) if projection and projection.maps else None})


def stage_sae(c: Check) -> Outcome:
    import numpy as np

    from groundtruth.features.activations import ActivationBatch, write_activations
    from groundtruth.features.exemplars import mine_exemplars
    from groundtruth.features.sae import SAEConfig, encoder, sae_metrics, train_sae
    from groundtruth.models import ModelSpec, load_model

    model, tok = load_model(ModelSpec(c.size.target, c.dtype), c.device)
    layer = model.config.num_hidden_layers // 2
    texts = [f"{SUBJECTS[i % len(SUBJECTS)]} {TEMPLATES[i % 2].format('it')} number {i}, said the report." for i in
             range(c.size.corpus_texts)]
    c.sync()
    start = time.perf_counter()
    n = write_activations(model, tok, texts, [layer], c.work / "acts", batch_size=64, max_tokens=48)
    c.sync()
    acts_s = time.perf_counter() - start
    batch = ActivationBatch.load(c.work / "acts")
    acts = np.asarray(batch.acts[layer])
    cfg = SAEConfig(d_sae=c.size.d_sae, k=c.size.sae_k, steps=c.size.sae_steps, batch_size=min(1024, len(acts) // 2))
    start = time.perf_counter()
    sae = train_sae(acts, cfg, device=c.device)
    c.sync()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    mined = mine_exemplars(batch, layer, encoder(sae), top_k=10, negatives=5, chunk_tokens=4096, device=c.device)
    c.sync()
    mine_s = time.perf_counter() - start
    metrics = sae_metrics(sae, acts)
    d = acts.shape[1]
    flops = 2.0 * params(model) * n + 6.0 * 2 * d * cfg.d_sae * cfg.steps * cfg.batch_size + 2 * 2 * d * cfg.d_sae * n
    ok = metrics["explained_variance"] > 0 and len(mined) > 0  # better than the mean; quality is tested elsewhere
    return Outcome(ok, acts_s + train_s + mine_s, n, flops, {
        "tokens": n, "activations_s": round(acts_s, 2), "train_s": round(train_s, 2), "mine_s": round(mine_s, 2),
        "d_sae": cfg.d_sae, "features_fired": len(mined), **{k: round(v, 3) for k, v in metrics.items()
                                                             if k in ("l0", "explained_variance", "dead_fraction")},
        "sae_on": str(sae.W_dec.device)})


STAGES: dict[str, Callable[[Check], Outcome]] = {
    "patching": stage_patching, "lstsq": stage_lstsq, "train_zero2": lambda c: _train(c, 2),
    "train_zero3": lambda c: _train(c, 3), "generation": stage_generation, "sae": stage_sae,
}


# ---------------------------------------------------------------- the run
def peak_flops(device: str, given: Optional[float]) -> tuple[Optional[float], str]:
    """FLOP/s utilisation is measured against: the GPU's dense bf16 peak, or on a CPU the fp32 matmul
    rate measured here (not a peak: a stage that runs larger matmuls than the probe can exceed 1)."""
    import torch

    if given:
        return given * 1e12, f"{given:g} TFLOP/s (given)"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        return (peak * 1e12, f"{peak:g} TFLOP/s bf16 ({name})") if peak else (None, f"unknown peak for {name}")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):  # the best of three: a busy machine only ever makes a run slower
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    rate = 2 * 2048 ** 3 / best
    return rate, f"{rate / 1e9:.0f} GFLOP/s fp32 matmul measured on this CPU"


def run_stage(name: str, check: Check) -> dict:
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return {"stage": name, "status": "SKIP", "why": f"needs {', '.join(missing)} (make gpu-wheels)"}
    import torch

    if check.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        out = STAGES[name](check)
    except Exception as err:  # a failed stage is reported and the others still run
        return {"stage": name, "status": "FAIL", "why": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    row = {"stage": name, "status": "ok" if out.ok else "FAIL", "device": check.device, "seconds": round(out.seconds, 3),
           "tokens_per_s": round(out.tokens / out.seconds, 1) if out.seconds else None,
           "mfu": round(out.flops / out.seconds / check.peak, 4) if check.peak and out.seconds else None,
           **(out.details or {})}
    if check.device == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    tune_this_process()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda where visible")
    parser.add_argument("--size", choices=sorted(SIZES), default="real", help="real shapes or tiny models")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no GPU visible (use --device cpu)", file=sys.stderr)
        return 2
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        print(f"gpu_check: unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    peak, peak_text = peak_flops(device, args.peak_tflops)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = Check(device, SIZES[args.size], Path(work), peak)
        print(f"gpu_check on {device} ({peak_text}), size {args.size}, torch {torch.__version__}", flush=True)
        for name in stages:
            row = run_stage(name, check)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("stage", "status", "trace")}
            print(f"  {row['status']:4} {name:12} {json.dumps(shown)}", flush=True)
            if row["status"] == "FAIL" and "trace" in row:
                print(row["trace"], file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    passed = all(r["status"] == "ok" for r in rows)
    print(f"gpu_check: {'PASS' if passed else 'FAIL'} in {total:.0f} s", flush=True)
    if args.out:
        result = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "peak": peak_text, "size": args.size, "torch": torch.__version__, "seconds": round(total, 1),
                  "passed": passed, "stages": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
