"""Shared fixtures: offline environment, tiny models, small record sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed's CPU comm op is compiled once into the project's own cache (see Makefile).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

def child_env() -> dict:
    """This process's environment less its torch.distributed rendezvous, for a child that makes its own (an
    earlier in-process test set MASTER_PORT here, and that port is taken by this process's store)."""
    from selfexplain.training.step import without_rendezvous

    return without_rendezvous(dict(os.environ))


from selfexplain.groundtruth.explanations import format_explanation  # noqa: E402
from selfexplain.groundtruth.records import Record  # noqa: E402


def make_records(n: int, target: str = "t", split: str = "train") -> list[Record]:
    """Input-ablation records with a learnable pattern: 'changed' iff the span is a distractor."""
    records = []
    for i in range(n):
        changed = i % 2 == 0
        before, after = f"City{i % 3}", (f"City{(i + 1) % 3}" if changed else f"City{i % 3}")
        records.append(Record(
            record_id=f"{target}-r{i:04d}", task="input_ablation", target=target, split=split, source_id=f"s{i}",
            prompt=f"{'Distractor. ' if changed else 'Support. '}The capital of Land{i % 3} is",
            question="If the first sentence were removed, how would the output change?",
            explanation=format_explanation(changed, after), changed=changed, output_before=before,
            output_after=after, query={"kind": "distractor" if changed else "support"},
        ))
    return records


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the default tiny random Llama."""
    from selfexplain.groundtruth.models import ModelSpec, load_model

    return load_model(ModelSpec("tiny-llama"))


def make_train_job(tmp_path: Path, **train):
    """A tiny-llama input-ablation TrainJob over 16 learnable records (written once under tmp_path)."""
    from selfexplain.groundtruth.models import ModelSpec
    from selfexplain.groundtruth.records import write_split
    from selfexplain.training.job import TrainConfig, TrainJob

    data = tmp_path / "data" / "train"
    if not data.exists():
        write_split(data, make_records(16), "h", shard_size=8)
    settings = {"micro_batch_size": 4, "lr": 3e-3, "use_ray": False, "checkpoint_every": 5, "log_every": 5, **train}
    return TrainJob("input_ablation", "t", "tiny", ModelSpec("tiny-llama"), str(data), str(tmp_path / "job"),
                    TrainConfig(**settings))


def run_one_model_pipeline(tmp_path: Path, name: str, source: str, tasks: dict, eval_settings: dict,
                           items_per_shard: int = 20, **extra):
    """The whole pipeline (ground truth on one Ray actor, two in-process training steps, eval on one Ray
    evaluator, the report) for one tiny model as target and explainer; returns the run's config."""
    import tempfile

    import yaml

    from selfexplain.distributed.config import load_config
    from selfexplain.distributed.pipeline import run as run_pipeline

    config = {
        "name": name, "out_dir": str(tmp_path / "run"), "models": {"m": {"source": source}}, "targets": ["m"],
        "explainers": ["m"], "tasks": tasks,
        "groundtruth": {"actors": 1, "actor_cpus": 0.5, "items_per_shard": items_per_shard, "batch_size": 8},
        "train": {"use_ray": False, "max_steps": 2, "micro_batch_size": 2, "log_every": 1},
        "eval": {"actors": 1, "actor_cpus": 0.5, **eval_settings},
        "ray": {"num_cpus": 2, "temp_dir": tempfile.mkdtemp(prefix="se-ray-")}, "wandb": {"enabled": False}, **extra,
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(str(tmp_path / f"{name}.yaml"))
    run_pipeline(cfg)
    return cfg
