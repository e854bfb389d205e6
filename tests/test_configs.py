"""Every shipped config loads and dry-runs (litgpt's test_config_hub): a recipe that rots fails here."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from selfexplain.distributed.cli import main as cli_main
from selfexplain.distributed.config import load_config
from selfexplain.groundtruth.models import describe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _paths_in(value) -> list[str]:
    """Values of a config section that look like file paths (a data file or folder it reads)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths_in(v)]
    return [value] if isinstance(value, str) and "/" in value and not value.startswith(("release:", "http")) else []


def test_the_shipped_configs_are_found():
    assert {"quickstart.yaml", "input_ablation.yaml", "feature_descriptions.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads_and_dry_runs(path, capsys, monkeypatch):
    """The plan prints; the only problems are what this machine lacks (hub weights, offline in tests,
    and the published data files a paper recipe names), each named."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(str(path))
    code = cli_main(["run", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    assert out.startswith(f"run {cfg.name} -> ") and "resolved config:" in out
    problems = err.splitlines()
    hub_ids = {spec.source for name, spec in cfg.models.items()
               if name in cfg.targets + cfg.explainers and describe(spec.source) == "hub id"}
    missing = {p for task_cfg in cfg.tasks.values() for p in _paths_in(dataclasses.asdict(task_cfg)) if not Path(p).exists()}
    assert code == (2 if problems else 0)
    assert all(any(x in line for x in hub_ids | missing) for line in problems), problems
    assert all(any(h in line for line in problems) for h in hub_ids), "every uncached hub id is named"
    if path.name == "quickstart.yaml":
        assert code == 0, "the offline default needs nothing this machine lacks"


FILE_REFERENCE = re.compile(
    r"(?<![\w/.])((?:groundtruth|training|eval|distributed|cluster|configs|docs|benchmarks|tests)/[\w/.\-]*\w\.(?:py|md|yaml|sh|sbatch))\b")


def test_every_file_the_code_and_docs_name_exists():
    """A module, config or doc named in a docstring, comment, config or doc is a file of the project."""
    sources = [p for pattern in ("*.py", "*.md", "*.yaml", "Makefile", "*.sbatch", "*.sh")
               for p in ROOT.rglob(pattern) if not {".venv", "runs", ".cache"} & set(p.relative_to(ROOT).parts)]
    missing = {(str(src.relative_to(ROOT)), ref) for src in sources
               for ref in FILE_REFERENCE.findall(src.read_text(errors="replace")) if not (ROOT / ref).exists()}
    docs = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}  # a doc named without its folder
    missing |= {(str(src.relative_to(ROOT)), name) for src in sources
                for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", src.read_text(errors="replace")) if name not in docs}
    assert not missing, sorted(missing)


def test_a_tasks_eval_only_settings_keep_its_ground_truth():
    """Settings a task config declares eval-only (feature descriptions' judge and K) leave the ground
    truth's hash as it is; any other setting changes it."""
    from selfexplain.distributed.gt_pool import gt_hash

    config = str(ROOT / "configs" / "quickstart.yaml")
    made = gt_hash(load_config(config, []), "feature_descriptions", "smollm2")
    for eval_only in ("judge=lexical", "discriminative_k=4"):
        assert gt_hash(load_config(config, [f"tasks.feature_descriptions.{eval_only}"]), "feature_descriptions", "smollm2") == made
    assert gt_hash(load_config(config, ["tasks.feature_descriptions.top_k=7"]), "feature_descriptions", "smollm2") != made


def test_a_setting_added_later_keeps_the_ground_truth_made_before_it_while_unset():
    """Activation patching's AtP screen: unset, the hash is what it was before the setting existed (the
    config's fields without it); set, it changes."""
    from selfexplain.distributed.gt_pool import gt_hash
    from selfexplain.distributed.typed_yaml import stable_hash

    config = str(ROOT / "configs" / "quickstart.yaml")
    cfg = load_config(config, [])
    before = {k: v for k, v in dataclasses.asdict(cfg.tasks["activation_patching"]).items() if k != "screen"}
    assert gt_hash(cfg, "activation_patching", "smollm2") == stable_hash({
        "task": before, "target": dataclasses.asdict(cfg.models["smollm2"]), "seed": cfg.seed,
        "items_per_shard": cfg.groundtruth.items_per_shard})
    screened = load_config(config, ["tasks.activation_patching.screen={top_fraction: 0.3}"])
    assert gt_hash(screened, "activation_patching", "smollm2") != gt_hash(cfg, "activation_patching", "smollm2")
