"""What labelling with a trained explainer saves: every latent of one SAE labelled by the self-explainer
(`selfexplain explain`'s work) against the same latents analysed by the feature task's ground-truth
pipeline on the same SAE (activations over the run's corpus, exemplars mined, every latent described),
in one run, on a run folder `make quickstart` made (SELFEXPLAIN_BENCH_RUN, default runs/quickstart).
Both sides' quality comes from that run: the validation sample of `selfexplain explain` (written by
`make quickstart`) and the ground truth's own mean simulation score.

`fast` is the explainer's seconds, `naive` the ground truth's, for the same d_sae latents; the target is
the issue's 20x. The ground truth here uses the offline describers (cheap: a paper-scale describer is a
70B model's API); the ratio is for this pipeline as configured, not for an LLM describer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

TASK, TARGET = "feature_descriptions", "smollm2"


def _run_folder() -> Path:
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("SELFEXPLAIN_BENCH_RUN", root / "runs" / "quickstart"))


def bench_explain_throughput(s) -> dict:
    from selfexplain.distributed.config import load_config
    from selfexplain.distributed.explain_pool import explain_job
    from selfexplain.eval.explain_units import UnitExplainer
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

    def analyse() -> int:
        """The recipe's first four steps on the same SAE (loaded as a pretrained one), in a fresh folder."""
        with tempfile.TemporaryDirectory() as tmp:
            task_cfg = dataclasses.replace(job.ctx.task_cfg, sae=dataclasses.replace(
                job.ctx.task_cfg.sae, pretrained=str(sae_dir(job.ctx, layer))))
            ctx = dataclasses.replace(job.ctx, task_cfg=task_cfg, folder=Path(tmp))
            run_steps(FEATURE_RECIPE.steps[:4], ctx, target)  # activations, SAE, exemplars, describe (no OOD sets)
            return json.loads((ctx.work / DESCRIBED).read_text())["raw"]["count"]  # every latent it labelled

    fast, labelled = s.timed(label, repeats=1)
    naive, described = s.timed(analyse, repeats=1)
    validation = json.loads((Path(job.out) / "validation.json").read_text()) if (Path(job.out) / "validation.json").exists() else {}
    stats = json.loads((cfg.layout.label_stats(TASK, TARGET)).read_text())
    quality = {"explainer": {k: validation.get("rows", {}).get("explainer", {}).get(k) for k in ("top1", "top1_lo", "top1_hi",
                                                                                                   "simulation", "judge")},
               "another unit's answer": {k: validation.get("rows", {}).get("another unit's answer", {}).get(k)
                                         for k in ("top1", "simulation")},
               "validation_sample": validation.get("labelled"),
               "ground_truth_mean_simulation": stats["raw"]["mean_simulation"]}
    return s.write("explain_throughput", fast, naive, 20.0,
                   {"run": run.name, "target": TARGET, "layer": layer, "latents": latents, "labelled": labelled,
                    "described_by_ground_truth": described, "corpus_texts": job.ctx.task_cfg.corpus_texts,
                    "explainer_latents_per_s": round(latents / fast, 2),
                    "ground_truth_latents_per_s": round(latents / naive, 2)}, quality=quality)
