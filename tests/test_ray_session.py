"""The environment every Ray worker of this driver starts with (distributed/ray_session.py), and the
allocator settings it and the entry points give a process (training/allocator.py)."""
import os
import subprocess
import sys

from selfexplain.distributed.ray_session import worker_env
from selfexplain.training.allocator import SETTINGS

# Ray Train's loop runs in a non-main thread. Here such a thread allocates and frees the same four
# buffers (64 MiB) 20 times, after `setup`; its process prints the minor page faults that took.
_THREAD_ALLOCATING = """
import resource, threading
{setup}
def loop():
    for _ in range(20):
        buffers = [bytearray(mib << 20) for mib in (20, 12, 24, 8)]
        del buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=loop)
thread.start()
thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ONCE = 64 * 256  # the 64 MiB in 4 KiB pages


def _faults(env: dict[str, str], setup: str = "") -> int:
    done = subprocess.run([sys.executable, "-c", _THREAD_ALLOCATING.format(setup=setup)], env=env,
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_the_allocator_settings_keep_a_threads_freed_buffers_mapped(monkeypatch):
    """glibc reads these names and mallopt takes these values: either way the 64 MiB fault in once, while
    with glibc's defaults they fault in again every round. The user's own value wins."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    bare = dict(os.environ)
    as_worker = _faults({**bare, **{k: worker_env()[k] for k in SETTINGS}})
    tuned = _faults(bare, "from training.allocator import tune_this_process; assert tune_this_process()")
    default = _faults(bare)
    print(f"[allocator] minor faults, 20 rounds of 64 MiB in a thread: {as_worker} as a Ray worker starts, "
          f"{tuned} after tune_this_process, {default} with glibc's defaults")
    assert as_worker < 2 * ONCE and tuned < 2 * ONCE and default > 10 * ONCE
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert worker_env()["MALLOC_ARENA_MAX"] == "4" and worker_env(local=True)["MALLOC_ARENA_MAX"] == "4"


def test_a_local_ray_turns_the_preemption_watcher_off_and_a_cluster_keeps_it(monkeypatch):
    """The variable is the one Ray Train reads; a local Ray sets it off unless the user set it; the
    environment a driver joining a cluster sends leaves it to the cluster."""
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR as watcher

    monkeypatch.delenv(watcher, raising=False)
    assert worker_env(local=True)[watcher] == "0" and watcher not in worker_env()
    monkeypatch.setenv(watcher, "1")
    assert worker_env(local=True)[watcher] == "1"
