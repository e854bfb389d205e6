"""What labelling with a trained explainer saves: every latent of one SAE labelled by the self-explainer
(`selfexplain explain`'s work) against the same latents analysed by the feature task's ground-truth
pipeline on the same SAE (activations over the run's corpus, exemplars mined, every latent described),
in one run, on a run folder `make quickstart` made (SELFEXPLAIN_BENCH_RUN, default runs/quickstart).

`naive` is the ground truth with an LLM describer, as auto-interpretability pipelines label SAEs: the
`llm` describer on the largest instruction-tuned model this machine holds, SmolLM2-135M-Instruct, run
in-process (`endpoint: {url: local}`) and batched like the explainer, shown every top exemplar with its
active tokens marked. That describer is the explainer's own size; the paper's (a 70B model's API
labelling for an 8B explainer) is hundreds of times the explainer's compute per token, so the ratio
here is the saving from prompt and answer lengths alone. `fast` is the explainer's seconds for the same
latents; the target is the issue's 20x. The ground truth with the offline describers (top tokens,
WordNet; no LLM) is timed too. Quality: the explainer's validation sample (written by `make
quickstart`) and each ground truth's mean simulation score.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

TASK, TARGET = "feature_descriptions", "smollm2"
DESCRIBER = "smollm2-135m-instruct"
DESCRIBER_TOKENS = 24  # the describe prompt asks for one phrase under 15 words


def _run_folder() -> Path:
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("SELFEXPLAIN_BENCH_RUN", root / "runs" / "quickstart"))


def bench_explain_throughput(s) -> dict:
    from selfexplain.distributed.config import load_config
    from selfexplain.distributed.explain_pool import explain_job
    from selfexplain.eval.explain_units import UnitExplainer
    from selfexplain.groundtruth.features.endpoint import LOCAL, EndpointConfig
    from selfexplain.groundtruth.features.recipe import DESCRIBED, FEATURE_RECIPE, sae_dir, sae_layers
    from selfexplain.groundtruth.models import load_model
    from selfexplain.groundtruth.stages import run_steps

    run = _run_folder()
    if not (run / "config.resolved.yaml").exists():
        return s.skip("explain_throughput", f"needs a finished quickstart run at {run} (make quickstart)")
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), [f"out_dir={run}"])
    job = explain_job(cfg, TASK, TARGET, TARGET)
    layer = sae_layers(job.ctx)[0]
    latents = sum(len(c) for c in job.chunks())

    worker = UnitExplainer(job, device=s.device)

    def label() -> int:
        return sum(len(worker.rows(chunk)) for chunk in job.chunks())

    target = load_model(job.ctx.model, s.device)
    describer = EndpointConfig(url=LOCAL, model=DESCRIBER, max_tokens=DESCRIBER_TOKENS, batch_size=64)

    def analyse(describers: list[str]) -> dict:
        """The recipe's first four steps on the same SAE (loaded as a pretrained one), in a fresh folder:
        the described set's statistics (every latent it labelled, their mean simulation)."""
        with tempfile.TemporaryDirectory() as tmp:
            task_cfg = dataclasses.replace(job.ctx.task_cfg, describers=describers, endpoint=describer, sae=dataclasses.replace(
                job.ctx.task_cfg.sae, pretrained=str(sae_dir(job.ctx, layer))))
            ctx = dataclasses.replace(job.ctx, task_cfg=task_cfg, folder=Path(tmp))
            run_steps(FEATURE_RECIPE.steps[:4], ctx, target)  # activations, SAE, exemplars, describe (no OOD sets)
            return json.loads((ctx.work / DESCRIBED).read_text())["raw"]

    fast, labelled = s.timed(label, repeats=1)
    naive, by_llm = s.timed(lambda: analyse(["llm"]), repeats=1, warmup=False)  # minutes: no warm-up
    offline, by_offline = s.timed(lambda: analyse(list(job.ctx.task_cfg.describers)), repeats=1)
    validation = json.loads((Path(job.out) / "validation.json").read_text()) if (Path(job.out) / "validation.json").exists() else {}
    rows = validation.get("rows", {})
    quality = {"explainer": {k: rows.get("explainer", {}).get(k) for k in ("top1", "top1_lo", "top1_hi", "simulation", "judge")},
               "another unit's answer": {k: rows.get("another unit's answer", {}).get(k) for k in ("top1", "simulation")},
               "validation_sample": validation.get("labelled"),
               "llm_describer_mean_simulation": by_llm.get("mean_simulation"),
               "llm_describer_examples": [e["description"] for e in by_llm.get("examples", [])],
               "offline_describers_mean_simulation": by_offline.get("mean_simulation")}
    return s.write("explain_throughput", fast, naive, 20.0,
                   {"run": run.name, "target": TARGET, "layer": layer, "latents": latents, "labelled": labelled,
                    "described_by_llm": by_llm["count"], "llm_describer": DESCRIBER,
                    "llm_describer_max_tokens": DESCRIBER_TOKENS, "corpus_texts": job.ctx.task_cfg.corpus_texts,
                    "explainer_latents_per_s": round(latents / fast, 2),
                    "llm_ground_truth_latents_per_s": round(latents / naive, 2),
                    "offline_ground_truth_s": round(offline, 2), "described_offline": by_offline["count"],
                    "offline_ground_truth_vs_explainer": round(offline / fast, 3)}, quality=quality)
