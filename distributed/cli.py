"""The `selfexplain` command: run the pipeline or one stage of it from a YAML config.

    selfexplain run configs/quickstart.yaml
    selfexplain train configs/quickstart.yaml --set train.lr=1e-4 --set train.zero_stage=3
    selfexplain run configs/paper/input_ablation.yaml --dry-run
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .typed_yaml import ConfigError

COMMANDS = {
    "run": "every stage in order: groundtruth, train, eval, report",
    "groundtruth": "generate ground-truth shards on the target models (Ray actor pool)",
    "train": "fine-tune every explainer on every target (Ray Train + DeepSpeed)",
    "eval": "score trained, untrained and baseline explainers; write matrix.json (Ray actors)",
    "report": "write report.md, heatmaps and the W&B run from matrix.json",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfexplain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value by dotted key (repeatable), e.g. train.lr=1e-4")
        cmd.add_argument("--dry-run", action="store_true", help="print the plan and resolved config; load no model")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from groundtruth.models import ModelSpecError
    from groundtruth.records import ShardError
    from training.export import CheckpointMismatch

    from .config import load_config
    from .pipeline import STAGES, plan, run

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(plan(cfg))
            return 0
        run(cfg, STAGES if args.command == "run" else (args.command,))
    except (ConfigError, ModelSpecError, ShardError, CheckpointMismatch, FileNotFoundError, ValueError) as err:
        # Bad input (config, model, data, checkpoint): a message to act on, not a traceback.
        print(f"selfexplain: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
