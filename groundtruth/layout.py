"""The run folder: every path a run reads or writes, in one place; file names are constants.

    runs/<name>/
      config.resolved.yaml                       the config after overrides, with the code version
      groundtruth/<task>/<target>/               raw/ (per-item tasks), train/, test/, act/, dact/, work/,
                                                 label_stats.json
      explainers/<task>/<explainer>_on_<target>[_<n>_per_layer]/
                                                 export/ (weights, projection.pt, selfexplain.json),
                                                 checkpoints/, projection_init.safetensors, train_log.jsonl, STOP
      jobs/<task>__<explainer folder>.json        one JOB.json per explainer (torchrun / SLURM)
      ray_train/                                 Ray Train's own storage
      eval/<task or task_set>/<target>/<row>.json one scored cell and its predictions
      matrix.json  report.md  heatmap_<task>.png  efficiency_<task>.png  wandb/
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

RESOLVED_CONFIG = "config.resolved.yaml"
LABEL_STATS = "label_stats.json"
MATRIX = "matrix.json"
REPORT = "report.md"
RAW = "raw"  # a per-item task's shards before balancing and splitting
# inside an explainer's folder
EXPORT = "export"
CHECKPOINTS = "checkpoints"
PROJECTION_INIT = "projection_init.safetensors"
TRAIN_LOG = "train_log.jsonl"
STOP = "STOP"  # written by a driver on SIGTERM: the ranks checkpoint and stop


def figure_name(kind: str, task: str) -> str:
    """File name of a report figure ('heatmap', 'efficiency', 'headline') of a matrix task ('<task>:<set>' too)."""
    return f"{kind}_{task.replace(':', '_')}.png"


class RunLayout:
    """Paths of one run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG

    def groundtruth(self, task: str, target: str) -> Path:
        """A task's ground truth on one target (its splits are subfolders)."""
        return self.root / "groundtruth" / task / target

    def split(self, task: str, target: str, split: str) -> Path:
        return self.groundtruth(task, target) / split

    def label_stats(self, task: str, target: str) -> Path:
        return self.groundtruth(task, target) / LABEL_STATS

    def explainer(self, task: str, target: str, explainer: str, per_layer: Optional[int] = None,
                  control: Optional[str] = None) -> Path:
        """An explainer's training folder (per_layer: a data-efficiency run on n records per layer;
        control: a trained control's explainer)."""
        name = (f"{explainer}_on_{target}" + (f"_{per_layer}_per_layer" if per_layer is not None else "")
                + (f"_{control}" if control else ""))
        return self.root / "explainers" / task / name

    def train_logs(self) -> list[Path]:
        return sorted(self.root.glob(f"explainers/*/*/{TRAIN_LOG}"))

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    def eval_cell(self, cell_task: str, target: str, row: str) -> Path:
        """A scored cell: matrix task ('<task>:<set>' too), target, row name."""
        return self.root / "eval" / cell_task.replace(":", "_") / target / f"{row.replace(' ', '_').replace(',', '')}.json"

    @property
    def matrix(self) -> Path:
        return self.root / MATRIX

    @property
    def report(self) -> Path:
        return self.root / REPORT

    def figure(self, kind: str, task: str) -> Path:
        return self.root / figure_name(kind, task)

    def figures(self) -> list[Path]:
        return [p for kind in ("heatmap", "efficiency", "headline") for p in sorted(self.root.glob(f"{kind}_*.png"))]

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"
