"""Speed benchmarks: each compares a fast path with the naive way on the same inputs, in one run.

    python -m benchmarks.run                 # all, results in benchmarks/results/<name>.json
    python -m benchmarks.run groundtruth     # one
    python -m benchmarks.run --device cuda   # on a GPU (bf16), results in benchmarks/results/gpu/

Every result file holds `fast` and `naive` (seconds for the same work), `ratio` (naive / fast, so
higher is better), `target` (the ratio asked for) and the workload. CPU timings are noisy: compare
ratios, not absolute seconds. Each timing is the median of `REPEATS` runs after one warm-up. Where
the work has a model FLOP count, `model_flop_utilisation` divides it by the fast path's seconds and the
peak (a GPU's dense bf16 peak; on a CPU the fp32 matmul rate measured in the run). Models whose packaged
weights are not installed (a bare GPU machine) are built at their real shapes with random weights; a
benchmark whose packages are missing is written as skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from benchmarks.atp_screen import bench_atp_screen
from benchmarks.explain_throughput import bench_explain_throughput
from benchmarks.ray_train_worker import bench_ray_train_worker
from benchmarks.token_attribution import bench_token_attribution
from benchmarks.setting import (RECIPE, Setting, explain_records, generation_flops, recipe_zero_stage,
                                train_batch, train_records, training_flops)
from selfexplain.groundtruth.ablation import AblationConfig, build_items, run_ablation
from selfexplain.groundtruth.generation import PROMPT_ROWS
from selfexplain.groundtruth.models import PACKAGED, ModelSpecError
from selfexplain.groundtruth.records import Record
from selfexplain.training.allocator import tune_this_process


def bench_groundtruth(s: Setting) -> dict:
    """Input-ablation ground truth on SmolLM2: batches of 16 inputs vs one input at a time."""
    from selfexplain.groundtruth.generation import render_prompt

    model, tok = s.load("smollm2-135m-instruct")
    cfg = AblationConfig(max_sources=4)
    items = build_items(cfg, seed=0)[:32]

    def run(batch: int) -> list[Record]:
        return run_ablation(model, tok, items, cfg, "smollm2", lambda _: "train", batch_size=batch)

    fast, fast_records = s.timed(lambda: run(16), repeats=1)
    naive, naive_records = s.timed(lambda: run(1), repeats=1)
    same = [r.explanation for r in fast_records] == [r.explanation for r in naive_records]
    prompt_tokens = sum(len(render_prompt(tok, text, "plain")) for it in items for text in (it.full, it.ablated))
    new_tokens = 2 * len(items) * cfg.max_new_tokens  # at most: a row that writes EOS stops
    return s.write("groundtruth", fast, naive, 3.0,
                   {"model": "smollm2-135m-instruct", "items": len(items), "generations": 2 * len(items),
                    "max_new_tokens": cfg.max_new_tokens, "fast_batch": 16, "naive_batch": 1},
                   model_flops=generation_flops(model, prompt_tokens, new_tokens), identical_labels=same)


EVAL_ROWS = 4
"""Rows one export answers in eval (a vector task's trained, no-vector, zero-v and shuffled-v rows)."""


def bench_eval_generation(s: Setting, batch: int = 64, questions: int = 48) -> dict:
    """Explainer generation on SmolLM2 as an evaluator runs it: EVAL_ROWS rows of `questions` each (three
    batches' worth), every prompt sorted by length, at most `batch` decoding together as the configs'
    eval.batch_size, prompts run in chunks of 16, KV cache, finished rows leave the batch; timed both
    with the next prompts joining the rows still writing (continuous) and with each batch drained
    before the next starts (drain). `fast` is the one greedy_generate picks on this device; `naive`
    asks one question at a time through explain_all.

    Chat format: in plain format the untrained model ends every answer at once (EOS as first token),
    which would time prompt encoding only; in chat format it writes a full answer, as a trained
    explainer does. The rows here differ in their records (no vectors: the base model has no [vec]).
    Random weights (no chat template in their byte tokenizer) run plain prompts and would never write
    EOS: there the byte the untrained model writes most becomes EOS, so answers end at different steps."""
    from selfexplain.eval.generate import Ask, explain_all
    from selfexplain.groundtruth.generation import greedy_generate
    from selfexplain.training.batches import encode_prompt

    model, tok = s.load("smollm2-135m-instruct")
    fmt = "plain" if s.random_weights else "chat"
    records = explain_records(questions * EVAL_ROWS)
    asks = [Ask(records[i::EVAL_ROWS]) for i in range(EVAL_ROWS)]
    prompts = [encode_prompt(tok, r, fmt, True) for ask in asks for r in ask.records]
    if s.random_weights:
        _common_token_as_eos(model, tok, prompts[:16])
    ways = s.timed_together({"continuous": lambda: greedy_generate(model, tok, prompts, 24, batch, continuous=True),
                             "drain": lambda: greedy_generate(model, tok, prompts, 24, batch, continuous=False)},
                            repeats=1)
    (continuous, out), (drain, drain_out) = ways["continuous"], ways["drain"]
    picked = "continuous" if s.device == "cuda" else "drain"  # greedy_generate's default here
    naive, naive_out = s.timed(lambda: explain_all(model, tok, asks, fmt, 24, batch_size=1), repeats=1)
    naive_flat = sum(naive_out, [])
    generated = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in naive_flat)
    prompt_tokens = sum(map(len, prompts))
    fast = ways[picked][0]
    return s.write("eval_generation", fast, naive, 10.0,
                   {"model": "smollm2-135m-instruct", "rows": EVAL_ROWS, "examples": len(records), "max_new_tokens": 24,
                    "generated_tokens": generated, "prompt_tokens": prompt_tokens, "prompt_format": fmt,
                    "fast_batch": batch, "prompt_rows": PROMPT_ROWS, "naive_batch": 1},
                   model_flops=generation_flops(model, prompt_tokens, generated), fast_is=picked,
                   identical_outputs=f"{sum(a == b for a, b in zip(ways[picked][1], naive_flat))}/{len(records)}",
                   tokens_per_second=round(generated / fast, 1), continuous=round(continuous, 4), drain=round(drain, 4),
                   continuous_vs_drain=round(drain / continuous, 3),
                   continuous_identical_to_drain=f"{sum(a == b for a, b in zip(out, drain_out))}/{len(records)}")


def _common_token_as_eos(model, tok, prompts: list) -> None:
    """Make the token an untrained model writes most often in its first answers the tokenizer's EOS."""
    from collections import Counter

    from selfexplain.groundtruth.generation import greedy_generate

    answers = greedy_generate(model, tok, prompts, 8, len(prompts), continuous=False)
    counts = Counter(t for a in answers for t in tok(a, add_special_tokens=False)["input_ids"])
    tok.eos_token_id = counts.most_common(1)[0][0]


def _padding(tok, micro: int = 8, examples: int = 128) -> dict:
    """Padding share of one epoch's micro-batches of real records, length windows on and off."""
    from selfexplain.training.batches import encode_example, micro_batch_order, padding_share

    lengths = [len(encode_example(tok, r, "plain", 256).ids) for r in train_records(examples)]
    share = {w: padding_share(micro_batch_order(lengths, 0, 1, micro, 0, 0, window=w), lengths) for w in (1, 16)}
    return {"padding_share": round(share[16], 4), "padding_share_random_batches": round(share[1], 4)}


def bench_train_step(s: Setting) -> dict:
    """One optimizer step on SmolLM2: the DeepSpeed engine (torch AdamW) at the ZeRO stage the device's
    recipe trains with (the CPU recipes: 0, one rank per job) vs a plain AdamW loop; ZeRO-2 on the same
    rank is reported beside it. All hold fp32 weights; on a GPU they compute in bf16 (DeepSpeed's bf16
    mode, autocast in the plain loop). The three take their steps in turn, 5 each (medians)."""
    from selfexplain.training.loss import ExplainerLM
    from selfexplain.training.job import TrainConfig, deepspeed_config
    from selfexplain.training.step import init_process_group_if_needed, initialize_engine

    init_process_group_if_needed()
    cuda = s.device == "cuda"

    def load():
        model, tok = s.load("smollm2-135m-instruct", dtype="float32")
        model.train()
        model.get_input_embeddings().weight.requires_grad_(False)  # train_embeddings: false, as every CPU config
        return model, tok

    model, tok = load()
    batch = s.to_device(train_batch(tok))
    plain = ExplainerLM(model)
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)

    def plain_step():
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = plain(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    precision = "bf16" if cuda else "fp32"

    def engine_step(stage: int) -> Callable[[], None]:
        ds_model, _ = load()
        cfg = TrainConfig(micro_batch_size=8, lr=1e-5, zero_stage=stage, precision=precision)
        engine = initialize_engine(ExplainerLM(ds_model), deepspeed_config(cfg, 1), world=1)

        def ds_step():
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
        return ds_step

    stage = recipe_zero_stage(s)
    ways = {"plain": plain_step, "engine": engine_step(stage)}
    if stage != 2:
        ways["zero2"] = engine_step(2)
    timed = s.timed_together(ways, repeats=5)
    naive, fast = timed["plain"][0], timed["engine"][0]
    zero2 = timed["zero2"][0] if stage != 2 else fast
    tokens = int(batch["attention_mask"].sum())
    return s.write("train_step", fast, naive, 0.9,
                   {"model": "smollm2-135m-instruct", "batch": 8, "tokens": tokens, "precision": precision,
                    "embedding": "frozen", "fast": f"deepspeed engine, ZeRO-{stage} ({RECIPE[s.device]}), torch AdamW",
                    "naive": "plain torch AdamW loop"},
                   model_flops=training_flops(model, tokens), tokens_per_second=round(tokens / fast, 1),
                   zero2_seconds=round(zero2, 4), zero2_ratio=round(naive / zero2, 3), **_padding(tok))


def bench_lm_head(s: Setting) -> dict:
    """Forward+backward on Gemma-3-270M (262k vocab) at the explainer's prompt lengths (input-ablation
    questions, plain format), its embedding (and the head tied to it) frozen as the configs train it:
    LM head on explanation tokens only vs full logits. The profile: the same step with no LM head at
    all (the decoder's output straight into a loss) bounds what any restriction of the head can reach,
    and that step plus the restricted head's own FLOPs at the measured peak bounds what this one can
    (the 92 labelled rows times the 262k vocabulary alone need 62 GFLOP). The three take their steps in
    turn."""
    from selfexplain.training.loss import ExplainerLM

    model, tok = s.load("gemma-3-270m")
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # train_embeddings: false
    batch = s.to_device(train_batch(tok))

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

    timed = s.timed_together({"restricted": step(True), "full": step(False), "body": body_only})
    (fast, fast_loss), (naive, naive_loss), (body, _) = timed["restricted"], timed["full"], timed["body"]
    tokens = int(batch["attention_mask"].sum())
    # What the restricted head cannot skip: logits for the labelled rows, and their gradient back to the
    # decoder (the head is tied to the frozen embedding, so no weight gradient), 2 FLOPs a multiply-add.
    rows = int((batch["labels"][:, 1:] != -100).sum())
    head_flops = 2 * 2 * rows * model.config.hidden_size * model.config.vocab_size
    return s.write("lm_head", fast, naive, 2.0,
                   {"model": "gemma-3-270m", "batch": 8, "tokens": tokens,
                    "loss_tokens": rows, "embedding": "frozen"},
                   model_flops=training_flops(model, tokens),
                   same_loss=abs(fast_loss - naive_loss) < (1e-3 if s.dtype == "float32" else 2e-2),
                   body_seconds=round(body, 4), ratio_if_the_head_cost_nothing=round(naive / body, 3),
                   head_share_of_the_restricted_step=round(1 - body / fast, 3), restricted_head_flops=head_flops,
                   ratio_if_the_head_ran_at_peak=round(naive / (body + head_flops / s.peak()), 3) if s.peak() else None)


PATCHING_PREAMBLE = ("The capital of Japan is Tokyo. The official language of Brazil is Portuguese. "
                     "The capital of Kenya is Nairobi. The official language of Egypt is Arabic.")
"""The study's few-shot preamble (configs/study_cpu.yaml): its positions are not patched, as in the task."""


def bench_patching(s: Setting) -> dict:
    """Activation patching on SmolLM2 as the study runs it: a few-shot preamble and then the fact, every
    (block, position of the fact) of 4 prompt pairs: the batched patcher from the cached clean runs (the
    pairs have one length, so their 8 prompts run in one forward after the preamble, run once), the
    prefix's keys and values cut from them, and one forward per block for the 4 pairs' interventions
    together, vs one hooked full forward per intervention. FLOP utilisation counts
    only what the fast path must compute (linear layers and LM head; attention scores are left out).
    fp32 on every device: labels are greedy decisions, compared as ground truth makes them."""
    from selfexplain.groundtruth.generation import shared_prefix
    from selfexplain.groundtruth.patching import (Intervention, PairPatches, decided_tokens, layer_blocks, pair_clean_runs, patch_pairs,
                                      patch_slow)

    model, tok = s.load("smollm2-135m-instruct", dtype="float32")
    pairs = [("France", "Spain"), ("Japan", "Italy"), ("Egypt", "Peru"), ("Canada", "Norway")]
    encode = lambda country: torch.tensor(tok(f"{PATCHING_PREAMBLE} The capital of {country} is")["input_ids"])  # noqa: E731
    prompts = [(x, y) for x, y in ((encode(a), encode(b)) for a, b in pairs) if len(x) == len(y)]
    preamble = len(tok(PATCHING_PREAMBLE)["input_ids"])
    layers = model.config.num_hidden_layers
    blocks = layer_blocks(layers, 4)
    plans = [[Intervention(b, t, t) for b in range(4) for t in range(preamble, len(x))] for x, _ in prompts]

    def fast_path():  # as run_patching goes through the pairs
        labels = {}
        for group in pair_clean_runs(model, prompts):
            jobs = [PairPatches(prompts[i][0], plans[i], clean, source) for i, clean, source in group]
            for job, (i, *_), patched in zip(jobs, group, patch_pairs(model, jobs, blocks)):
                labels[i] = decided_tokens((job.clean.decision, patched))
        return [labels[i] for i in range(len(prompts))]

    def naive_path():
        return [decided_tokens(patch_slow(model, x, y, blocks, plan)) for (x, y), plan in zip(prompts, plans)]

    fast, fast_labels = s.timed(fast_path, repeats=1)
    naive, naive_labels = s.timed(naive_path, repeats=1)
    per_token_layer = 2 * sum(p.numel() for p in model.model.layers[0].parameters())
    head = 2 * model.config.hidden_size * model.config.vocab_size
    shared = shared_prefix([ids for pair in prompts for ids in pair])  # the preamble: one forward for all clean runs
    flops = (shared + sum(len(ids) - shared for pair in prompts for ids in pair)) * layers * per_token_layer
    flops += 2 * len(prompts) * head  # each clean run's decision
    for (x, y), plan in zip(prompts, plans):
        first = min(iv.position for iv in plan)  # earlier positions: keys and values cut from the clean run
        flops += sum((len(x) - first) * (layers - blocks[iv.block][0]) * per_token_layer + head for iv in plan)
    return s.write("patching", fast, naive, 6.0,
                   {"model": "smollm2-135m-instruct", "pairs": len(prompts), "blocks": 4, "prompt_tokens": len(prompts[0][0]),
                    "patched_positions_per_pair": len(prompts[0][0]) - preamble, "interventions": sum(len(p) for p in plans)},
                   model_flops=flops, identical_labels=fast_labels == naive_labels)


def bench_head_patching(s: Setting) -> dict:
    """Attention-head patching on SmolLM2 as the task runs it (the study's few-shot preamble, then the
    fact): every one of its 270 heads for 2 pairs, patched at the last position, each head one row of x's
    last token over x's cached keys and values (up to 64 rows a forward), vs one hooked full forward of x
    per head. Identical labels required; FLOP utilisation counts the linear layers and LM head of what the
    fast path computes (both clean runs, then one token through every layer per head). fp32."""
    from selfexplain.groundtruth.head_patching import every_head, head_run, patch_heads, patch_heads_slow

    model, tok = s.load("smollm2-135m-instruct", dtype="float32")
    encode = lambda country: torch.tensor(tok(f"{PATCHING_PREAMBLE} The capital of {country} is")["input_ids"])  # noqa: E731
    pairs = [(encode(a), encode(b)) for a, b in (("France", "Spain"), ("Japan", "Italy"))]
    heads = every_head(model)

    def labels(result) -> list[int]:
        return [result.clean.token] + [d.token for d in result.patched]

    fast, fast_labels = s.timed(lambda: [labels(patch_heads(model, x, y, heads, clean=head_run(model, x),
                                                            source=head_run(model, y))) for x, y in pairs], repeats=1)
    naive, naive_labels = s.timed(lambda: [labels(patch_heads_slow(model, x, y, heads)) for x, y in pairs], repeats=1)
    per_token = model.config.num_hidden_layers * 2 * sum(p.numel() for p in model.model.layers[0].parameters())
    head = 2 * model.config.hidden_size * model.config.vocab_size  # the LM head: last positions only
    flops = sum((len(x) + len(y) + len(heads)) * per_token + (2 + len(heads)) * head for x, y in pairs)
    return s.write("head_patching", fast, naive, 10.0,
                   {"model": "smollm2-135m-instruct", "pairs": len(pairs), "heads": len(heads),
                    "prompt_tokens": len(pairs[0][0])},
                   model_flops=flops, identical_labels=fast_labels == naive_labels)


BENCHMARKS = {"groundtruth": bench_groundtruth, "eval_generation": bench_eval_generation,
              "train_step": bench_train_step, "ray_train_worker": bench_ray_train_worker,
              "lm_head": bench_lm_head, "patching": bench_patching, "head_patching": bench_head_patching,
              "atp_screen": bench_atp_screen, "token_attribution": bench_token_attribution,
              "explain_throughput": bench_explain_throughput}


NEEDS = {"groundtruth": ("countryinfo",), "atp_screen": ("countryinfo",), "token_attribution": ("countryinfo", "captum"),
         "eval_generation": ("countryinfo",),
         "train_step": ("countryinfo", "deepspeed"), "lm_head": ("countryinfo",),
         "ray_train_worker": ("countryinfo", "deepspeed", "ray", "webdataset"),
         "explain_throughput": ("sae_lens", "webdataset")}
"""Packages a benchmark needs beyond torch and transformers (countryinfo: the questions' facts)."""


def packaged_weights() -> bool:
    """Whether every packaged model's weights are installed here."""
    try:
        for locate in PACKAGED.values():
            locate()
    except ModelSpecError:
        return False
    return True


def main(argv: list[str]) -> int:
    tune_this_process()  # the allocator the pipeline's processes run with
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16; results in benchmarks/results/gpu/)")
    parser.add_argument("--weights", choices=["auto", "packaged", "random"], default="auto",
                        help="auto: the packaged weights where installed, else random weights at the real shapes")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    names = args.names or list(BENCHMARKS)
    if len(names) > 1:
        return run_each_in_its_own_process(names, ["--device", args.device, "--weights", args.weights])
    torch.set_num_threads(int(os.environ.get("SELFEXPLAIN_BENCH_THREADS", os.cpu_count() or 1)))
    random_weights = args.weights == "random" or (args.weights == "auto" and not packaged_weights())
    setting = Setting(args.device, random_weights)
    missing = [m for m in NEEDS.get(names[0], ()) if importlib.util.find_spec(m) is None]
    if missing:
        setting.skip(names[0], f"needs {', '.join(missing)}")
    else:
        BENCHMARKS[names[0]](setting)
    return 0


def run_each_in_its_own_process(names: list[str], options: list[str]) -> int:
    """Each benchmark in a fresh interpreter, so none inherits another's heap, thread pools or loaded
    models. All in one process, on 2 threads, the fp32 matmul rate read 141 GFLOP/s and the DeepSpeed
    step 0.83 of the plain loop; each in its own, 337 GFLOP/s and 1.06."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    failed = [name for name in names
              if subprocess.run([sys.executable, "-m", "benchmarks.run", name, *options], cwd=root).returncode != 0]
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
