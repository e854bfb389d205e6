"""The `selfexplain` command: run the pipeline or one stage of it from a YAML config.

    selfexplain run configs/quickstart.yaml
    selfexplain train configs/quickstart.yaml --set train.lr=1e-4 --set train.zero_stage=3
    selfexplain run configs/paper/input_ablation.yaml --dry-run
    selfexplain submit configs/paper/input_ablation.yaml --address http://head:8265 --follow
    selfexplain explain configs/quickstart.yaml --task feature_descriptions --explainer smollm2 --target smollm2
    selfexplain convert-export runs/old/explainers/*/*/export
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from selfexplain.groundtruth.errors import BadInput, ConfigError, bad_input_in
from selfexplain.training.allocator import tune_this_process

COMMANDS = {
    "run": "every stage in order: groundtruth, train, eval, report",
    "groundtruth": "generate ground-truth shards on the target models (Ray actor pool)",
    "train": "fine-tune every explainer on every target (Ray Train + DeepSpeed)",
    "eval": "score trained, untrained and baseline explainers; write matrix.json (Ray actors)",
    "report": "write report.md, heatmaps and the W&B run from matrix.json",
    "jobs": "write one JOB.json per explainer under <run>/jobs (torchrun / SLURM training without Ray)",
}


def _add_overrides(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value by dotted key (repeatable), e.g. train.lr=1e-4")


def _bad_input(err: BadInput) -> int:
    """Bad input (config, model, data, shard, checkpoint): one line to act on, not a traceback; status 2."""
    print(f"selfexplain: error: {type(err).__name__}: {err}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfexplain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        _add_overrides(cmd)
        cmd.add_argument("--dry-run", action="store_true", help="print the plan and resolved config; load no model")
        if name == "report":
            cmd.add_argument("--wandb", action="store_true",
                             help="also publish a W&B report (matrix, figures, learning curves); needs W&B online")
    cmd = sub.add_parser("submit", help=SUBMIT, description=SUBMIT)
    cmd.add_argument("config", help="YAML run config inside this repository, e.g. configs/quickstart.yaml")
    cmd.add_argument("--address", help="the cluster's job server, e.g. http://head:8265 (default: $RAY_ADDRESS)")
    cmd.add_argument("--runtime-env", help="runtime env YAML (default: cluster/runtime_env.yaml)")
    cmd.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 if it fails")
    cmd.add_argument("--pip", action="store_true",
                     help="have Ray install this package's requirements for the job (an image without the stack)")
    _add_overrides(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="print the entrypoint and runtime env; submit nothing")
    cmd = sub.add_parser("explain", help=EXPLAIN, description=EXPLAIN)
    cmd.add_argument("config", help="the YAML run config whose ground truth and explainers to use")
    cmd.add_argument("--task", required=True, help="the task whose units to explain (one of the config's tasks)")
    cmd.add_argument("--explainer", required=True, help="the explainer model's name in the config")
    cmd.add_argument("--target", required=True, help="the target model's name in the config")
    cmd.add_argument("--export", help="an explainer export folder (default: the run's trained one)")
    cmd.add_argument("--source", help="units of another source than the run analysed: an SAE folder or "
                                      "release:<release>:<sae_id> ('{layer}' in it for several --layers); for "
                                      "input ablation a prompts file (JSON lines {prompt, spans}); for "
                                      "activation patching a CounterFact file")
    cmd.add_argument("--layers", type=int, nargs="+", help="only units at these layers (default: all)")
    cmd.add_argument("--limit", type=int, help="at most N work items (latents, pairs, inputs), the first ones")
    cmd.add_argument("--chunk-size", type=int, help="work items per output shard (default: the task's)")
    cmd.add_argument("--validate", type=int, default=200, metavar="N",
                     help="units sampled for validation against the task's own technique (default 200)")
    _add_overrides(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="print the plan (units, shards, GPU-hours); load no model")
    cmd = sub.add_parser("convert-export", help=CONVERT, description=CONVERT)
    cmd.add_argument("folders", nargs="+", help="export folders, e.g. runs/<name>/explainers/<task>/<pair>/export")
    return parser


EXPLAIN = ("ask a trained explainer about every unit of a target its task could analyse (every SAE latent, "
           "every patching position, every span), validate a sample against the technique; writes "
           "<run>/explain/<task>/<explainer>_on_<target>/: shards, validation.json, index.html")
SUBMIT = "run the whole pipeline as a Ray job on a running cluster (ships this repository)"
CONVERT = ("rewrite explainer exports of an earlier selfexplain as Hugging Face / PEFT folders, in place "
           "(no retraining; the base model must be loadable here)")


def main(argv: Optional[list[str]] = None) -> int:
    tune_this_process()
    args = build_parser().parse_args(argv)
    if args.command == "submit":
        return _submit(args)
    if args.command == "convert-export":
        return _convert(args.folders)
    if args.command == "explain":
        return _explain(args)
    from .config import load_config
    from .pipeline import STAGES, plan, run
    from .preflight import input_problems

    stages = STAGES if args.command == "run" else (args.command,)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(plan(cfg))
            problems = input_problems(cfg, stages)
            return max([_bad_input(problem) for problem in problems], default=0)
        if args.command == "jobs":
            from .train_job import write_job_files

            for path in write_job_files(cfg):
                print(path)
            return 0
        run(cfg, stages)
        if getattr(args, "wandb", False):
            import json

            from .wandb_report import publish_report

            print(f"[report] W&B report: {publish_report(cfg, json.loads(cfg.layout.matrix.read_text()))}")
    except Exception as err:  # noqa: BLE001  (bad input is reported; anything else is a bug: re-raised)
        bad = bad_input_in(err)
        if bad is None:
            raise
        return _bad_input(bad)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .config import load_config
    from .explain_pool import explain_job, plan_explain, run_explain
    from .ray_session import ray_session

    try:
        cfg = load_config(args.config, args.overrides)
        for kind, name in (("task", args.task), ("explainer", args.explainer), ("target", args.target)):
            known = list(cfg.tasks) if kind == "task" else list(cfg.models)
            if name not in known:
                raise ConfigError(f"--{kind} {name!r} is not in {args.config} (known: {', '.join(known)})")
        job = explain_job(cfg, args.task, args.explainer, args.target, args.export, args.limit, args.layers,
                          args.chunk_size, args.source)
        if args.dry_run:
            print("\n".join(plan_explain(cfg, job)))
            return 0
        with ray_session(cfg.ray):
            validation = run_explain(cfg, job, args.validate)
    except Exception as err:  # noqa: BLE001  (as in main: bad input is reported, a bug re-raised)
        bad = bad_input_in(err)
        if bad is None:
            raise
        return _bad_input(bad)
    from selfexplain.eval.explain_validation import summary_lines

    print("\n".join(summary_lines(validation)))
    print(f"[explain] {job.out}: shards, validation.json, index.html")
    return 0


def _convert(folders: list[str]) -> int:
    from selfexplain.training.convert import convert_export

    for folder in folders:
        try:
            print(f"{folder}: {'converted' if convert_export(folder) else 'already current'}")
        except BadInput as err:
            return _bad_input(err)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from .config import load_config
    from .submit import submit

    try:
        load_config(args.config, args.overrides)  # a bad config fails here, not minutes later on the cluster
        out = submit(args.config, args.overrides, args.address, args.runtime_env, args.follow, args.dry_run, args.pip)
    except BadInput as err:
        return _bad_input(err)
    except RuntimeError as err:  # the job ran and failed
        print(f"selfexplain: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
