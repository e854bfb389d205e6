"""Several Ray nodes on one host (ray.cluster_utils.Cluster): a CPU head that runs the driver and three
worker nodes with one logical GPU each. Ground-truth actors and Ray Train workers each take a GPU, so
they land on different nodes. Mid-run, one actor is killed and another's node is removed: their
units are redone elsewhere and every record is present exactly once."""
import json
import os
import socket
import tempfile
import threading
import time
from collections import Counter

import pytest
import yaml

from selfexplain.distributed.config import load_config
from selfexplain.groundtruth.faults import FAULT_ENV
from selfexplain.distributed.pipeline import run
from selfexplain.distributed.ray_session import worker_env
from selfexplain.groundtruth.ablation import build_items
from selfexplain.groundtruth.records import iter_records, safe_key

CONFIG = {
    "name": "multinode",
    "models": {"a": {"source": "tiny-llama:hidden=32,layers=2"}},
    "targets": ["a"],
    "explainers": ["a"],
    "tasks": {"input_ablation": {"max_sources": 12, "test_fraction": 0.3, "max_new_tokens": 3,
                                 "span": {"answer_pattern": "\\S+"}}},
    "groundtruth": {"actors": 2, "actor_cpus": 0.5, "actor_gpus": 1, "items_per_shard": 8, "batch_size": 8},
    "train": {"num_workers": 2, "worker_cpus": 0.5, "use_gpu": True, "backend": "gloo", "zero_stage": 3,
              "max_steps": 4, "micro_batch_size": 2, "checkpoint_every": 2, "log_every": 2},
}


@pytest.fixture()
def cluster():
    import ray
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="se-ray-")  # short: Ray's socket paths have a length limit
    # The head writes <TMPDIR>/ray/ray_current_cluster whatever temp_dir says, and fails when that folder
    # does not exist yet: on a fresh machine (or a fresh TMPDIR) no earlier Ray run has made it.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    with socket.socket() as sock:  # not 8265: a Ray session of the user's may hold it, and the state API needs ours
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": temp,
                                                            "dashboard_port": dashboard_port})
    try:  # a node that fails to start must not leave the head running for the tests after this one
        for _ in range(3):
            cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _actor_nodes(class_name: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("class_name", "=", class_name)], limit=1000) if a.node_id}


def test_ground_truth_and_training_across_nodes_survive_a_lost_node_and_a_killed_actor(cluster, tmp_path, monkeypatch):
    import ray

    data = {**CONFIG, "out_dir": str(tmp_path / "run")}
    (tmp_path / "multinode.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(str(tmp_path / "multinode.yaml"))
    killed, hung = tmp_path / "killed", tmp_path / "hung"
    monkeypatch.setenv(FAULT_ENV, f"kill:0:{killed},hang:2:{hung}")
    ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})  # the pipeline joins this cluster

    removed: list[str] = []

    def remove_the_hung_node() -> None:  # what a preempted or failed machine looks like to Ray
        deadline = time.time() + 300
        while not hung.exists() and time.time() < deadline:
            time.sleep(0.2)
        node_id = hung.read_text()
        node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node_id)

    remover = threading.Thread(target=remove_the_hung_node, daemon=True)
    remover.start()
    run(cfg, ("groundtruth",))
    remover.join(timeout=5)
    assert killed.exists() and removed == [hung.read_text()], "both faults happened during ground truth"
    assert len(_actor_nodes("TargetWorker")) >= 2, "one GPU per node: the two actors ran on two nodes"

    gt = cfg.run_dir / "groundtruth" / "input_ablation" / "a"
    expected = sorted(safe_key("a", "input_ablation", i.item_id) for i in build_items(cfg.tasks["input_ablation"], cfg.seed))
    present = Counter(r.record_id for r in iter_records(gt / "raw"))
    print(f"[faults] ground truth: {len(expected)} records expected, {sum(present.values())} present "
          f"({len(present)} distinct) after a killed actor and a removed node")
    assert sorted(present) == expected and set(present.values()) == {1}, "every record exactly once"
    assert not list((gt / "raw").glob(".*")), "no partial shard survives"

    run(cfg, ("train",))  # ZeRO-3 over 2 ranks on the 2 GPU nodes left
    export = cfg.run_dir / "explainers" / "input_ablation" / "a_on_a" / "export"
    assert json.loads((export / "selfexplain.json").read_text())["steps"] == 4
    assert len(_actor_nodes("RayTrainWorker")) == 2
