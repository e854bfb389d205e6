"""Inputs a user gets wrong: each is one line naming the key, file or model, exit 2, from --dry-run and
from a real run, and nothing is written (no run folder, no config.resolved.yaml overwritten)."""
from __future__ import annotations

import pytest
import yaml

from selfexplain.distributed.cli import main as cli_main
from selfexplain.groundtruth.errors import BadInput, bad_input_in
from selfexplain.training.export import CheckpointMismatch

BASE = {"name": "bad", "models": {"a": {"source": "tiny-llama"}}, "targets": ["a"], "explainers": ["a"],
        "tasks": {"input_ablation": {"max_sources": 3}}, "ray": {"num_cpus": 1}}


def _config(tmp_path, **changes) -> str:
    data = {**BASE, "out_dir": str(tmp_path / "run"), **changes}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfexplain: error: "), lines
    return lines[0]


def _inputs(tmp_path) -> dict[str, tuple[dict, list[str], list[str]]]:
    """name -> (config changes, --set overrides, what the message must name)."""
    (tmp_path / "bad_counterfact.json").write_text('{"not": "a list"')
    mmlu = lambda path: {"input_ablation": {"source": "hint_mcq", "hint": {"questions": "mmlu", "mmlu_path": path}}}
    features = {"feature_descriptions": {"describers": ["neuronpedia"], "neuronpedia": str(tmp_path / "np.jsonl"),
                                         "layers": [1]}}
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "empty mmlu_path": (dict(tasks=mmlu("")), [], ["mmlu_path"]),
        "missing mmlu_path": (dict(tasks=mmlu(str(tmp_path / "no_mmlu"))), [], ["tasks.input_ablation", "no_mmlu"]),
        "malformed CounterFact": (dict(tasks={"activation_patching": {
            "source": "counterfact", "counterfact_path": str(tmp_path / "bad_counterfact.json")}}), [],
            ["tasks.activation_patching", "bad_counterfact.json", "not valid JSON"]),
        "missing Neuronpedia export": (dict(tasks=features), [], ["tasks.feature_descriptions", "np.jsonl"]),
        "unknown tiny option": (dict(models={"a": {"source": "tiny-llama:layrs=2"}}), [], ["models.a.source", "layrs=2"]),
        "mistyped hub id": (dict(models={"a": {"source": "HuggingFaceTB/SmolLM2-135M-Instrukt"}}), [],
                            ["models.a.source", "HuggingFaceTB/SmolLM2-135M-Instrukt"]),
        "out_dir is a file": (dict(out_dir=str(tmp_path / "a_file" / "run")), [], ["out_dir", "a_file"]),
        "unparsable --set": ({}, ["train.lr=[1,"], ["--set train.lr"]),
    }


CASES = ["empty mmlu_path", "missing mmlu_path", "malformed CounterFact", "missing Neuronpedia export",
         "unknown tiny option", "mistyped hub id", "out_dir is a file", "unparsable --set"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_from_a_dry_run_and_a_real_run(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id is looked up in the local cache only
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    changes, overrides, named = _inputs(tmp_path)[case]
    config = _config(tmp_path, **changes)
    sets = [arg for o in overrides for arg in ("--set", o)]
    for argv in (["run", config, "--dry-run", *sets], ["groundtruth", config, *sets], ["run", config, *sets]):
        assert cli_main(argv) == 2, argv
        line = _one_error(capsys)
        assert all(part in line for part in named), (argv, line)
        assert not (tmp_path / "run").exists(), "a failed command leaves no run folder"


def test_a_failed_command_keeps_the_resolved_config_of_the_last_good_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.yaml").write_text("the last good run's config\n")
    config = _config(tmp_path, tasks={"input_ablation": {"source": "hint_mcq", "hint": {
        "questions": "mmlu", "mmlu_path": str(tmp_path / "no_mmlu")}}})
    assert cli_main(["run", config]) == 2
    assert "no_mmlu" in _one_error(capsys)
    assert (run_dir / "config.resolved.yaml").read_text() == "the last good run's config\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.resolved.yaml"]


def test_bad_input_raised_inside_a_ray_worker_is_found_behind_the_wrapper():
    from ray.exceptions import RayTaskError

    cause = CheckpointMismatch("export/ was trained for target b, not a")
    wrapped = RayTaskError("evaluate", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
    assert bad_input_in(wrapped) is cause
    try:
        try:
            raise cause
        except BadInput as err:
            raise RuntimeError("training failed") from err
    except RuntimeError as outer:
        assert bad_input_in(outer) is cause
    assert bad_input_in(KeyError("a bug")) is None
