"""`selfexplain submit`: the job it builds, its refusals, and a real submission to a local Ray job server
that runs the whole pipeline (tiny models) on the cluster side."""
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from selfexplain.distributed.cli import main as cli_main
from selfexplain.distributed.submit import AGENT_NOT_READY, REPO, runtime_env, submit, submit_when_agent_ready

TINY = [  # the quickstart config shrunk to tiny models and one task, through --set alone
    "models.smollm2.source=tiny-llama:hidden=32,layers=2", "models.gemma.source=tiny-llama:hidden=48,layers=2,seed=1",
    "tasks.activation_patching=null", "tasks.feature_descriptions=null", "tasks.head_patching=null",
    "tasks.token_attribution=null", "tasks.input_ablation.max_sources=12",
    "tasks.input_ablation.test_fraction=0.3",
    "tasks.input_ablation.balance=false", "tasks.input_ablation.span.answer_pattern=\\S+",
    "groundtruth.actors=1", "groundtruth.actor_cpus=0.5", "train.max_steps=2", "train.micro_batch_size=2",
    "train.worker_cpus=0.5", "eval.actors=1", "eval.actor_cpus=0.5", "eval.baselines=[majority]",
    "eval.max_new_tokens=4", "wandb.mode=disabled",
]


def test_submit_dry_run_shows_the_job_and_ships_the_repository_without_heavy_folders(capsys):
    assert cli_main(["submit", "configs/quickstart.yaml", "--address", "http://head:8265",
                     "--set", "train.lr=2e-4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "address: http://head:8265" in out
    assert "entrypoint: python -m selfexplain.distributed.cli run configs/quickstart.yaml --set train.lr=2e-4 --set ray.address=auto" in out
    env = runtime_env()
    assert env["working_dir"] == str(REPO) and {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["WANDB_MODE"] == "offline", "cluster/runtime_env.yaml is merged in"
    assert "pip" not in env
    packages = runtime_env(pip=True)["pip"]["packages"]
    assert any(p.startswith("deepspeed") for p in packages) and not any("pytest" in p for p in packages)


def test_submit_refuses_what_would_fail_on_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli_main(["submit", "configs/quickstart.yaml"]) == 2
    assert "no cluster address" in capsys.readouterr().err
    outside = tmp_path / "mine.yaml"
    outside.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    assert cli_main(["submit", str(outside), "--address", "http://head:8265"]) == 2
    assert "must live inside the repository" in capsys.readouterr().err
    assert cli_main(["submit", "configs/quickstart.yaml", "--address", "http://head:8265", "--set", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err, "a bad config fails before submission"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_submitted_job_runs_the_pipeline_on_the_cluster(tmp_path, monkeypatch):
    import ray
    from ray._private.parameter import RayParams

    # the job's `python` is this interpreter (a cluster image has its own environment on PATH)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    port, agent_port = free_port(), free_port()
    # The job agent listens on a fixed default port (52365), which another Ray cluster on this machine (a
    # run, another test session) may hold: its agent would not start and no job could be submitted.
    # ray.init does not take the agent's port, so the node's parameters get a free one.
    init_params = RayParams.__init__
    monkeypatch.setattr(RayParams, "__init__", lambda self, *a, **kw: init_params(
        self, *a, **{"dashboard_agent_listen_port": agent_port, **kw}))
    temp_dir = tempfile.mkdtemp(prefix="se-ray-")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_port=port, _temp_dir=temp_dir)
    # The job's driver finds its cluster by the address `ray start` records in the cluster's temp dir, and
    # without one, any cluster running on this machine: ray.init records none, so record this one's.
    from ray._private.utils import write_ray_address

    write_ray_address(ray.get_runtime_context().gcs_address, temp_dir)
    try:
        out_dir = tmp_path / "run"
        job_id = submit("configs/quickstart.yaml", [*TINY, f"out_dir={out_dir}"], f"http://127.0.0.1:{port}", follow=True)
    finally:
        ray.shutdown()
    assert job_id.startswith("raysubmit_")
    matrix = json.loads((out_dir / "matrix.json").read_text())
    assert set(matrix["tasks"]) == {"input_ablation"}
    assert {"smollm2 trained", "gemma trained", "majority"} <= set(matrix["tasks"]["input_ablation"]["rows"])


def test_runtime_env_file_is_checked_and_never_moves_the_shipped_folder(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        runtime_env(path)
    path.write_text("working_dir: /elsewhere\nexcludes: [data/]\n")
    env = runtime_env(path)
    assert env["working_dir"] == str(REPO) and "data/" in env["excludes"] and ".venv/" in env["excludes"]


def test_submission_waits_for_the_job_agent_and_raises_anything_else():
    answers = [RuntimeError(f"Request failed with status code 500: {AGENT_NOT_READY}, please try again later.")] * 2
    calls = []

    def submit_job():
        calls.append(1)
        if answers:
            raise answers.pop()
        return "raysubmit_1"

    assert submit_when_agent_ready(submit_job, wait_s=5, poll_s=0.01) == "raysubmit_1" and len(calls) == 3
    with pytest.raises(RuntimeError, match="status code 400"):
        submit_when_agent_ready(lambda: (_ for _ in ()).throw(RuntimeError("status code 400: bad entrypoint")), poll_s=0.01)
