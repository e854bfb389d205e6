"""Training survives what clusters do to it: SIGTERM (preemption), a crashed Ray Train worker, and a
resume on a different number of ranks."""
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import child_env, make_train_job
from selfexplain.distributed.config import RayConfig
from selfexplain.distributed.ray_session import ray_session
from selfexplain.distributed.train_job import fit_with_ray
from selfexplain.training import checkpoints
from selfexplain.training.preemption import PREEMPTED_EXIT_CODE, TRAIN_FAULT_ENV
from selfexplain.training.step import run_training

ROOT = Path(__file__).resolve().parents[1]

def logged(job) -> list[dict]:
    return [json.loads(line) for line in (Path(job.out_dir) / "train_log.jsonl").read_text().splitlines()]


def exported_steps(job) -> int:
    return json.loads((job.export_dir / "selfexplain.json").read_text())["steps"]


def test_sigterm_checkpoints_the_current_step_and_a_rerun_resumes_there(tmp_path, capsys):
    job = make_train_job(tmp_path, max_steps=100_000, checkpoint_every=10**6, log_every=5)
    spec = tmp_path / "job.json"
    spec.write_text(job.to_json())
    proc = subprocess.Popen([sys.executable, "-m", "selfexplain.training.step", str(spec)], cwd=ROOT, env=child_env())
    log, deadline = Path(job.out_dir) / "train_log.jsonl", time.time() + 180
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # 10 steps done
        assert proc.poll() is None and time.time() < deadline, "training stopped or stalled before the signal"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
    point = checkpoints.resume_point(job.checkpoint_dir, world=1, zero_stage=job.train.zero_stage)
    assert point is not None and point.step >= 10 and not point.universal, "no periodic checkpoint was due: SIGTERM wrote it"
    assert not job.export_dir.exists()

    capsys.readouterr()
    more = make_train_job(tmp_path, max_steps=point.step + 3, checkpoint_every=10**6, log_every=5)
    assert run_training(more)["steps"] == point.step + 3
    assert f"resumed at step {point.step}/" in capsys.readouterr().out
    steps = [e["step"] for e in logged(more)]
    assert steps == sorted(set(steps)) and steps[-1] == point.step + 3 and steps[0] == 5


def test_a_crashed_train_worker_is_restarted_and_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    """Rank 1 dies after step 3 of the first job; Ray Train restarts the group, which resumes that job from
    its step-2 checkpoint and then trains the second job. Both end exactly as an uninterrupted run."""
    settings = {"max_steps": 6, "checkpoint_every": 2, "log_every": 1, "num_workers": 2, "worker_cpus": 0.5,
                "use_ray": True, "zero_stage": 2, "micro_batch_size": 2}
    crashed = make_train_job(tmp_path / "crashed", **settings)
    clean = make_train_job(tmp_path / "clean", **settings)
    marker = tmp_path / "rank1-crashed"
    monkeypatch.setenv(TRAIN_FAULT_ENV, f"1:3:{marker}")  # forwarded to the Ray workers (SELFEXPLAIN_*)
    with ray_session(RayConfig(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="se-ray-"))):
        fit_with_ray([crashed, clean], tmp_path / "ray_train")
    assert marker.exists(), "the fault was injected"
    assert exported_steps(crashed) == exported_steps(clean) == 6
    resumed, uninterrupted = logged(crashed), logged(clean)
    print(f"[faults] resumed after a crash: {[(e['step'], round(e['loss'], 6)) for e in resumed]}\n"
          f"[faults] uninterrupted:         {[(e['step'], round(e['loss'], 6)) for e in uninterrupted]}")
    assert [e["step"] for e in resumed] == [e["step"] for e in uninterrupted] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in uninterrupted], rel=1e-4)


def test_resuming_on_another_number_of_ranks_converts_to_a_universal_checkpoint(tmp_path):
    first = make_train_job(tmp_path, max_steps=4, checkpoint_every=2, micro_batch_size=2,
                           keep_checkpoints_after_export=True)
    run_training(first)  # one rank; keeps its step-4 checkpoint
    more = make_train_job(tmp_path, max_steps=6, checkpoint_every=2, micro_batch_size=2)
    spec = tmp_path / "more.json"
    spec.write_text(more.to_json())
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "selfexplain.training.step", str(spec)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 4/6 (a step0000004 of another world size" in done.stdout
    assert exported_steps(more) == 6
    assert [e["step"] for e in logged(more)] == [4, 5, 6]


def test_sigterm_to_the_pipeline_checkpoints_its_ray_train_ranks_and_a_rerun_resumes(tmp_path):
    """Under Ray Train SIGTERM reaches the driver (`selfexplain run`); it writes the running jobs' stop
    files, both ranks checkpoint the same step and return, and the driver exits 143."""
    config = {"name": "preempt", "out_dir": str(tmp_path / "run"),
              "models": {"a": {"source": "tiny-llama:hidden=32,layers=2"}}, "targets": ["a"], "explainers": ["a"],
              "tasks": {"input_ablation": {"max_sources": 12, "test_fraction": 0.3, "max_new_tokens": 3,
                                           "span": {"answer_pattern": "\\S+"}}},
              "groundtruth": {"actors": 1, "actor_cpus": 0.5, "items_per_shard": 32, "batch_size": 8},
              "train": {"num_workers": 2, "worker_cpus": 0.5, "max_steps": 100_000, "micro_batch_size": 2,
                        "checkpoint_every": 10**6, "log_every": 5},
              "ray": {"num_cpus": 2, "temp_dir": tempfile.mkdtemp(prefix="se-ray-")}, "wandb": {"mode": "disabled"}}
    path = tmp_path / "preempt.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "selfexplain.distributed.cli"]
    proc = subprocess.Popen([*cli, "run", str(path)], cwd=ROOT, env=child_env())
    folder = tmp_path / "run" / "explainers" / "input_ablation" / "a_on_a"
    log, deadline = folder / "train_log.jsonl", time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run stopped or stalled before the signal"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == PREEMPTED_EXIT_CODE
    point = checkpoints.resume_point(folder / "checkpoints", world=2, zero_stage=2)
    assert point is not None and point.step >= 10 and not (folder / "export").exists()

    done = subprocess.run([*cli, "train", str(path), "--set", f"train.max_steps={point.step + 2}"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed at step {point.step}/{point.step + 2}" in done.stdout + done.stderr
    assert json.loads((folder / "export" / "selfexplain.json").read_text())["steps"] == point.step + 2
