"""`selfexplain submit`: the pipeline as a Ray job on a running cluster.

The repository is shipped as the job's working directory (without the venv, runs and caches) with
the runtime environment of `cluster/runtime_env.yaml`; on the cluster the job runs
`python -m selfexplain.distributed.cli run CONFIG --set ray.address=auto`, so the driver joins the cluster it
was submitted to. Clusters with Ray's token authentication (on by default since Ray 2.52) need
RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token) here;
JobSubmissionClient adds it to every request.
"""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from selfexplain.groundtruth.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
# Never uploaded: Ray caps a working directory at 500 MB and the venv alone is over 2 GB.
EXCLUDES = [".venv/", "runs/", ".cache/", ".git/", "wandb/", "**/__pycache__/", "*.egg-info/"]


def entrypoint(config: str, overrides: list[str]) -> str:
    """The command the job runs on the cluster (config paths are relative to the repository)."""
    args = ["python", "-m", "selfexplain.distributed.cli", "run", config]
    for override in [*overrides, "ray.address=auto"]:
        args += ["--set", override]
    return shlex.join(args)


def requirements() -> list[str]:
    """This package's install requirements, as installed (for clusters whose image lacks the stack)."""
    from importlib.metadata import requires

    return [r for r in requires("selfexplain") or [] if "extra ==" not in r]


def runtime_env(path: Optional[Path] = None, pip: bool = False) -> dict:
    """The job's runtime env: the YAML file's settings plus the working directory and excludes; with
    pip, every worker's environment also gets this package's requirements installed by Ray."""
    path = Path(path) if path else DEFAULT_RUNTIME_ENV
    env = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: a runtime env must be a mapping, got {type(env).__name__}")
    env = {**env, "working_dir": str(REPO), "excludes": sorted(set(env.get("excludes", [])) | set(EXCLUDES))}
    if pip:
        env["pip"] = {"packages": requirements(), "pip_check": False}
    return env


AGENT_NOT_READY = "No available agent to submit job"
"""What Ray's job server answers (HTTP 500) while no node's job agent is up: for a moment after a
cluster starts, and after the head restarts."""


def submit_when_agent_ready(submit_job: Callable[[], str], wait_s: float = 120.0, poll_s: float = 2.0) -> str:
    """submit_job(), retried while the cluster's job agent is not up yet (any other error is raised)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return submit_job()
        except RuntimeError as err:
            if AGENT_NOT_READY not in str(err) or time.monotonic() > deadline:
                raise
            print(f"[submit] the cluster's job agent is not up yet; retrying for up to {wait_s:.0f} s", flush=True)
            time.sleep(poll_s)


def submit(config: str, overrides: list[str], address: Optional[str], runtime_env_path: Optional[str] = None,
           follow: bool = False, dry_run: bool = False, pip: bool = False) -> str:
    """Submit the pipeline; return the submission id (or the plan, for a dry run). With follow, stream
    the job's logs and raise if it does not succeed."""
    config_path = Path(config).resolve()
    if not config_path.is_relative_to(REPO):
        raise ConfigError(f"{config}: the config must live inside the repository ({REPO}), which is what the job ships")
    rel = str(config_path.relative_to(REPO))
    command, env = entrypoint(rel, overrides), runtime_env(Path(runtime_env_path) if runtime_env_path else None, pip)
    if dry_run:
        return f"address: {address or os.environ.get('RAY_ADDRESS') or '(none: set --address or RAY_ADDRESS)'}\n" \
               f"entrypoint: {command}\nruntime_env: {env}"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = submit_when_agent_ready(lambda: client.submit_job(entrypoint=command, runtime_env=env, metadata={"config": rel}))
    print(f"[submit] {job_id} on {address}: {command}\n"
          f"[submit] follow with: ray job logs --address {address} -f {job_id}", flush=True)
    if follow:
        printed = 0
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            print(logs[printed:], end="", flush=True)
            printed = len(logs)
            time.sleep(2)
        print(client.get_job_logs(job_id)[printed:], end="", flush=True)
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended {status}: {client.get_job_info(job_id).message}")
    return job_id
