"""GPU check: every domain stage in one process on one device, with time, tokens/s and model FLOP
utilisation, on random-init models of the real shapes (no weights to download) or tiny ones.

    python -m benchmarks.gpu_check                          # on a GPU: SmolLM2-135M / Gemma-3-270M shapes
    python -m benchmarks.gpu_check --device cpu             # tiny models, a few minutes on a laptop
    make gpu-check                                          # the first, results in benchmarks/results/gpu/

Stages, in order (each feeds the next, as the pipeline does):
  patching       the fast patcher against one hooked forward per intervention in fp32 (labels must agree
                 wherever the reference's decision is not a near-tie), then the ground-truth records
  patching_bf16  the same in bf16: labels agree except near-ties (top-two gap under 0.25), counted
  chat_template  a Qwen3-style template renders the recipe's prompts without opening a thinking block
  lstsq          Pi fitted between the target and a model of another family and width, on the device
  train_zero2 / train_zero3
                 a full fine-tune through `python -m selfexplain.training.step JOB.json` (one rank, bf16): the loss
                 must fall, the export load back, and the target's spare embedding rows survive ZeRO-3
  lora_zero2 / lora_zero3
                 LoRA with a checkpoint, the job killed hard after it and rerun: it resumes and logs the
                 same losses for the steps both runs took
  cross          an explainer of another family reads v through the lstsq Pi: trained and evaluated
  generation     the self-explainer's export explains held-out records with v injected (batched, KV cache)
  sae            activations written to a shard, a TopK SAE trained, exemplars mined in chunks
  two_gpus       a model spread over two GPUs decodes and runs clean_runs as on one (skipped on one GPU)
Each stage has its own time limit (--stage-timeout); one that hangs past it is reported and the check
goes on, and one stuck inside a kernel ends the check with every thread's traceback. Beyond torch and
transformers it needs deepspeed and webdataset (training) and sae-lens (sae); a stage whose package is
missing is reported SKIP and the check fails. `make gpu-wheels` builds the wheels a GPU machine without
them needs (benchmarks/gpu_wheels.sh).
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from selfexplain.training.allocator import tune_this_process

from .gpu_common import SIZES, Check, Outcome, Skipped
from .gpu_stages import (stage_atp, stage_chat_template, stage_continuous, stage_generation, stage_head_patching, stage_lstsq,
                         stage_patching, stage_patching_bf16, stage_sae, stage_two_gpus)
from .gpu_train_stages import lora_resumed, train_cross, train_full

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 peak by GPU name (first match wins): what utilisation is measured against."""
TRAINING = ("deepspeed", "webdataset")
NEEDS = {"train_zero2": TRAINING, "train_zero3": TRAINING, "lora_zero2": TRAINING, "lora_zero3": TRAINING,
         "cross": TRAINING, "generation": TRAINING, "continuous": TRAINING, "sae": ("sae_lens",), "two_gpus": ("accelerate",)}

STAGES: dict[str, Callable[[Check], Outcome]] = {
    "patching": stage_patching, "patching_bf16": stage_patching_bf16, "head_patching": stage_head_patching,
    "atp": stage_atp,
    "chat_template": stage_chat_template,
    "lstsq": stage_lstsq, "train_zero2": lambda c: train_full(c, 2), "train_zero3": lambda c: train_full(c, 3),
    "lora_zero2": lambda c: lora_resumed(c, 2), "lora_zero3": lambda c: lora_resumed(c, 3), "cross": train_cross,
    "generation": stage_generation, "continuous": stage_continuous, "sae": stage_sae, "two_gpus": stage_two_gpus,
}
"""In order: patching makes the records every later stage reads, lstsq the Pi cross reads, train_zero3
the export generation and continuous read."""


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


class StageTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StageTimeout()


def run_stage(name: str, check: Check, timeout: float) -> dict:
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return {"stage": name, "status": "SKIP", "why": f"needs {', '.join(missing)} (make gpu-wheels)"}
    import torch

    if check.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    check.deadline = time.monotonic() + timeout  # subprocesses get what is left of it
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout) + 1)
    # stuck where SIGALRM cannot reach (inside a kernel): every thread's traceback, and the check ends
    faulthandler.dump_traceback_later(timeout + 60, exit=True, file=sys.__stderr__)
    try:
        out = STAGES[name](check)
    except Skipped as why:
        return {"stage": name, "status": "SKIP", "why": str(why), "optional": True}
    except StageTimeout:
        return {"stage": name, "status": "FAIL", "why": f"over its {timeout:g} s limit"}
    except Exception as err:  # a failed stage is reported and the others still run
        return {"stage": name, "status": "FAIL", "why": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
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
    parser.add_argument("--size", choices=sorted(SIZES), help="real shapes or tiny models (default: real on a GPU, tiny on a CPU)")
    parser.add_argument("--stage-timeout", type=float, default=240.0, help="seconds one stage may take")
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
    size = args.size or ("real" if device == "cuda" else "tiny")
    peak, peak_text = peak_flops(device, args.peak_tflops)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = Check(device, SIZES[size], Path(work), peak)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        print(f"gpu_check on {device} ({peak_text}; {gpus} GPUs), size {size}, torch {torch.__version__}", flush=True)
        for name in stages:
            row = run_stage(name, check, args.stage_timeout)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("stage", "status", "trace")}
            print(f"  {row['status']:4} {name:12} {json.dumps(shown)}", flush=True)
            if row["status"] == "FAIL" and "trace" in row:
                print(row["trace"], file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    passed = all(r["status"] == "ok" or r.get("optional") for r in rows)
    print(f"gpu_check: {'PASS' if passed else 'FAIL'} in {total:.0f} s", flush=True)
    if args.out:
        result = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "peak": peak_text, "size": size, "torch": torch.__version__, "seconds": round(total, 1),
                  "passed": passed, "stages": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
