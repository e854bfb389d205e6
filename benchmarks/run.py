"""Speed benchmarks: each compares a fast path with the naive way on the same inputs, in one run.

    python -m benchmarks.run                 # all, results in benchmarks/results/<name>.json
    python -m benchmarks.run groundtruth     # one

Every result file holds `fast` and `naive` (seconds for the same work), `ratio` (naive / fast, so
higher is better), `target` (the ratio asked for) and the workload. CPU timings are noisy: compare
ratios, not absolute seconds. Each timing is the median of `REPEATS` runs after one warm-up.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from groundtruth.ablation import AblationConfig, build_items, run_ablation
from groundtruth.generation import PROMPT_ROWS
from groundtruth.models import ModelSpec, load_model
from groundtruth.records import Record

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = 3


def timed(fn: Callable[[], object], repeats: int = REPEATS) -> tuple[float, object]:
    """Median seconds of fn() over `repeats` runs after one warm-up, and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write(name: str, fast: float, naive: float, target: float, workload: dict, **extra) -> dict:
    out = {"name": name, "fast": round(fast, 4), "naive": round(naive, 4), "ratio": round(naive / fast, 3),
           "target": target, "meets_target": naive / fast >= target, "workload": workload,
           "torch_threads": torch.get_num_threads(), **extra}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


def bench_groundtruth() -> dict:
    """Input-ablation ground truth on SmolLM2: batches of 16 inputs vs one input at a time."""
    model, tok = load_model(ModelSpec("smollm2-135m-instruct"))
    cfg = AblationConfig(max_sources=4)
    items = build_items(cfg, seed=0)[:32]

    def run(batch: int) -> list[Record]:
        return run_ablation(model, tok, items, cfg, "smollm2", lambda s: "train", batch_size=batch)

    fast, fast_records = timed(lambda: run(16), repeats=1)
    naive, naive_records = timed(lambda: run(1), repeats=1)
    same = [r.explanation for r in fast_records] == [r.explanation for r in naive_records]
    return write("groundtruth", fast, naive, 3.0,
                 {"model": "smollm2-135m-instruct", "items": len(items), "generations": 2 * len(items),
                  "max_new_tokens": cfg.max_new_tokens, "fast_batch": 16, "naive_batch": 1},
                 identical_labels=same)


def _explain_records(n: int) -> list[Record]:
    """n explainer questions about real ablation inputs (gold fields left empty)."""
    cfg = AblationConfig(max_sources=n)
    items = build_items(cfg, seed=1)[:n]
    return [Record(f"r{i}", "input_ablation", "t", "test", it.source_id, it.full, it.question, "", False, "", "")
            for i, it in enumerate(items)]


EVAL_ROWS = 4
"""Rows one export answers in eval (a vector task's trained, no-vector, zero-v and shuffled-v rows)."""


def bench_eval_generation(batch: int = 64) -> dict:
    """Explainer generation on SmolLM2 as an evaluator runs it: EVAL_ROWS rows of 16 questions each
    through explain_all (every prompt of the rows sorted by length, `batch` of them generated together as
    the configs' eval.batch_size, prompts run in chunks of 16, KV cache, finished rows leave the batch)
    vs one question at a time through the same function.

    Chat format: in plain format the untrained model ends every answer at once (EOS as first token),
    which would time prompt encoding only; in chat format it writes a full answer, as a trained
    explainer does. The rows here differ in their records (no vectors: the base model has no [vec])."""
    from eval.generate import Ask, explain_all

    model, tok = load_model(ModelSpec("smollm2-135m-instruct"))
    records = _explain_records(16 * EVAL_ROWS)
    asks = [Ask(records[i::EVAL_ROWS]) for i in range(EVAL_ROWS)]
    fast, fast_out = timed(lambda: explain_all(model, tok, asks, "chat", 24, batch_size=batch), repeats=1)
    naive, naive_out = timed(lambda: explain_all(model, tok, asks, "chat", 24, batch_size=1), repeats=1)
    fast_flat, naive_flat = sum(fast_out, []), sum(naive_out, [])
    same = sum(a == b for a, b in zip(fast_flat, naive_flat))
    generated = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in naive_flat)
    return write("eval_generation", fast, naive, 6.0,
                 {"model": "smollm2-135m-instruct", "rows": EVAL_ROWS, "examples": len(records), "max_new_tokens": 24,
                  "generated_tokens": generated, "prompt_format": "chat", "fast_batch": batch, "prompt_rows": PROMPT_ROWS,
                  "naive_batch": 1},
                 identical_outputs=f"{same}/{len(records)}", tokens_per_second=round(generated / fast, 1))


def _train_records(n: int) -> list[Record]:
    """n input-ablation training records: real prompts, explanations of both kinds."""
    from groundtruth.explanations import format_explanation

    records = _explain_records(n)
    for i, r in enumerate(records):
        r.explanation = format_explanation(i % 2 == 0, "Paris")
    return records


def _train_batch(tok, n: int = 8):
    from training.batches import collate, encode_example

    return collate([encode_example(tok, r, "plain", 256) for r in _train_records(n)], tok.pad_token_id)


def _padding(tok, micro: int = 8, examples: int = 128) -> dict:
    """Padding share of one epoch's micro-batches of real records, length windows on and off."""
    from training.batches import encode_example, micro_batch_order, padding_share

    lengths = [len(encode_example(tok, r, "plain", 256).ids) for r in _train_records(examples)]
    share = {w: padding_share(micro_batch_order(lengths, 0, 1, micro, 0, 0, window=w), lengths) for w in (1, 16)}
    return {"padding_share": round(share[16], 4), "padding_share_random_batches": round(share[1], 4)}


def bench_train_step() -> dict:
    """One optimizer step on SmolLM2: DeepSpeed engine (ZeRO-2, torch AdamW) vs a plain AdamW loop."""
    import deepspeed

    from training.loss import ExplainerLM
    from training.job import TrainConfig, deepspeed_config
    from training.step import init_process_group_if_needed

    init_process_group_if_needed()
    model, tok = load_model(ModelSpec("smollm2-135m-instruct"))
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # train_embeddings: false, as every CPU config
    batch = _train_batch(tok)
    plain = ExplainerLM(model)
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)

    def plain_step():
        loss = plain(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    naive, _ = timed(plain_step)
    optimizer.state.clear()  # free the plain loop's Adam state before the DeepSpeed model loads
    ds_model, _ = load_model(ModelSpec("smollm2-135m-instruct"))
    ds_model.train()
    ds_model.get_input_embeddings().weight.requires_grad_(False)
    cfg = TrainConfig(micro_batch_size=8, lr=1e-5, zero_stage=2)
    engine, *_ = deepspeed.initialize(model=ExplainerLM(ds_model), config=deepspeed_config(cfg, 1),
                                      model_parameters=[p for p in ds_model.parameters() if p.requires_grad])

    def ds_step():
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()

    fast, _ = timed(ds_step)
    tokens = int(batch["attention_mask"].sum())
    return write("train_step", fast, naive, 0.9,
                 {"model": "smollm2-135m-instruct", "batch": 8, "tokens": tokens,
                  "embedding": "frozen", "fast": "deepspeed ZeRO-2 engine, torch AdamW", "naive": "plain torch AdamW loop"},
                 tokens_per_second=round(tokens / fast, 1), **_padding(tok))


def bench_ray_train_worker() -> dict:
    """One training job (SmolLM2, ZeRO-2, micro batch 8, 2 CPUs) run by a Ray Train worker vs in this
    process: seconds per optimizer step from the job's own log, the first logged step (warm-up) left out.
    fast: the Ray worker (ratio = in-process / Ray, so 1.0 means no cost)."""
    import shutil
    import tempfile

    from distributed.config import RayConfig
    from distributed.ray_session import ray_session
    from distributed.train_job import fit_with_ray
    from groundtruth.records import write_split
    from training.job import TrainConfig, TrainJob
    from training.step import run_training

    steps, threads = 8, torch.get_num_threads()
    root = Path(tempfile.mkdtemp(prefix="bench_ray_train_"))
    write_split(root / "data", _train_records(steps * 8), "h", shard_size=32)

    def job(name: str) -> TrainJob:
        cfg = TrainConfig(micro_batch_size=8, lr=1e-5, max_steps=steps, log_every=1, checkpoint_every=steps,
                          train_embeddings=False, prompt_format="plain", worker_cpus=float(threads))
        return TrainJob("input_ablation", "smollm2", "smollm2", ModelSpec("smollm2-135m-instruct"),
                        str(root / "data"), str(root / name), cfg)

    def per_step(j: TrainJob) -> float:
        log = [json.loads(line) for line in j.train_log.read_text().splitlines()]
        return (log[-1]["seconds"] - log[0]["seconds"]) / (log[-1]["step"] - log[0]["step"])

    try:
        here = job("in_process")
        run_training(here)
        worker = job("ray")
        with ray_session(RayConfig(num_cpus=threads)):  # as the pipeline starts a local Ray
            fit_with_ray([worker], root / "ray")
        naive, fast = per_step(here), per_step(worker)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return write("ray_train_worker", fast, naive, 0.9,
                 {"model": "smollm2-135m-instruct", "steps": steps, "micro_batch": 8, "zero_stage": 2,
                  "fast": f"Ray Train worker ({threads} CPUs)", "naive": "the same loop in this process"})


def bench_lm_head() -> dict:
    """Forward+backward on Gemma-3-270M (262k vocab) at the explainer's prompt lengths (input-ablation
    questions, plain format), its embedding (and the head tied to it) frozen as the configs train it:
    LM head on explanation tokens only vs full logits. The profile: the same step with no LM head at
    all (the decoder's output straight into a loss) bounds what any restriction of the head can reach."""
    from training.loss import ExplainerLM

    model, tok = load_model(ModelSpec("gemma-3-270m"))
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # train_embeddings: false
    batch = _train_batch(tok)

    def step(restrict: bool):
        def run():
            loss = ExplainerLM(model, restrict_head=restrict)(**batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()
        return run

    def body_only():
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    fast, fast_loss = timed(step(True))
    naive, naive_loss = timed(step(False))
    body, _ = timed(body_only)
    return write("lm_head", fast, naive, 2.0,
                 {"model": "gemma-3-270m", "batch": 8, "tokens": int(batch["attention_mask"].sum()),
                  "loss_tokens": int((batch["labels"] != -100).sum()), "embedding": "frozen"},
                 same_loss=abs(fast_loss - naive_loss) < 1e-3, body_seconds=round(body, 4),
                 ratio_if_the_head_cost_nothing=round(naive / body, 3),
                 head_share_of_the_restricted_step=round(1 - body / fast, 3))


def matmul_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul rate of this machine (the arithmetic limit the FLOP utilisation is against)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds, _ = timed(lambda: a @ b, repeats)
    return 2 * size ** 3 / seconds


PATCHING_PREAMBLE = ("The capital of Japan is Tokyo. The official language of Brazil is Portuguese. "
                     "The capital of Kenya is Nairobi. The official language of Egypt is Arabic.")
"""The study's few-shot preamble (configs/study_cpu.yaml): its positions are not patched, as in the task."""


def bench_patching() -> dict:
    """Activation patching on SmolLM2 as the study runs it: a few-shot preamble and then the fact, every
    (block, position of the fact) of 4 prompt pairs: the batched patcher from the cached clean run (the
    preamble run once for x and x') and the prefix's keys and values (x and x' have one length here, so
    they come from the clean run) vs one hooked full forward per intervention. FLOP utilisation counts
    only what the fast path must compute (linear layers and LM head; attention scores are left out)."""
    from groundtruth.generation import shared_prefix
    from groundtruth.patching import Intervention, decided_tokens, layer_blocks, patch_fast, patch_slow

    model, tok = load_model(ModelSpec("smollm2-135m-instruct"))
    pairs = [("France", "Spain"), ("Japan", "Italy"), ("Egypt", "Peru"), ("Canada", "Norway")]
    encode = lambda country: torch.tensor(tok(f"{PATCHING_PREAMBLE} The capital of {country} is")["input_ids"])  # noqa: E731
    prompts = [(x, y) for x, y in ((encode(a), encode(b)) for a, b in pairs) if len(x) == len(y)]
    preamble = len(tok(PATCHING_PREAMBLE)["input_ids"])
    layers = model.config.num_hidden_layers
    blocks = layer_blocks(layers, 4)
    plans = [[Intervention(b, t, t) for b in range(4) for t in range(preamble, len(x))] for x, _ in prompts]

    def run(patcher):
        return [decided_tokens(patcher(model, x, y, blocks, plan)) for (x, y), plan in zip(prompts, plans)]

    fast, fast_labels = timed(lambda: run(patch_fast), repeats=1)
    naive, naive_labels = timed(lambda: run(patch_slow), repeats=1)
    per_token_layer = 2 * sum(p.numel() for p in model.model.layers[0].parameters())
    head = 2 * model.config.hidden_size * model.config.vocab_size
    flops = 0
    for (x, y), plan in zip(prompts, plans):
        shared = shared_prefix([x, y])  # the preamble: one forward for both clean runs
        flops += (shared + 2 * (len(x) - shared)) * layers * per_token_layer + 2 * head  # clean runs of x and x'
        first = min(iv.position for iv in plan)  # earlier positions: keys and values cut from the clean run
        flops += sum((len(x) - first) * (layers - blocks[iv.block][0]) * per_token_layer + head for iv in plan)
    rate = matmul_flops_per_second()
    return write("patching", fast, naive, 6.0,
                 {"model": "smollm2-135m-instruct", "pairs": len(prompts), "blocks": 4, "prompt_tokens": len(prompts[0][0]),
                  "patched_positions_per_pair": len(prompts[0][0]) - preamble, "interventions": sum(len(p) for p in plans)},
                 identical_labels=fast_labels == naive_labels, fast_forward_flops=flops,
                 matmul_flops_per_second=round(rate), flop_utilisation=round(flops / (rate * fast), 3))


BENCHMARKS = {"groundtruth": bench_groundtruth, "eval_generation": bench_eval_generation,
              "train_step": bench_train_step, "ray_train_worker": bench_ray_train_worker,
              "lm_head": bench_lm_head, "patching": bench_patching}


def main(argv: list[str]) -> int:
    torch.set_num_threads(int(os.environ.get("SELFEXPLAIN_BENCH_THREADS", os.cpu_count() or 1)))
    names = argv or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        BENCHMARKS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
