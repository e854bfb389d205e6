"""The actor pool hands its live actors to the next pool of the same kind, and kills them all on an error;
a pool of fewer units than workers gives each unit the idle workers' CPUs; the training stage deals its
jobs among concurrent worker groups."""
import tempfile
import time

import pytest

from selfexplain.distributed.actor_pool import run_pool
from selfexplain.distributed.ray_session import idle_share
from selfexplain.distributed.train_job import deal


def test_a_pool_leaves_its_healthy_actors_to_the_next_and_kills_every_actor_on_an_error():
    import ray
    from ray.exceptions import RayActorError

    ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="se-ray-"))
    try:
        # fewer units than actors: each unit also takes the idle actors' CPUs, never more than a node has
        assert idle_share(1.0, 2, 1) == 2.0 and idle_share(0.5, 2, 1) == 1.0 and idle_share(0.5, 3, 1) == 1.5
        assert idle_share(1.0, 2, 2) == 1.0 and idle_share(1.0, 2, 5) == 1.0
        assert idle_share(1.0, 4, 1) == 2.0, "capped at the largest node's 2 CPUs"
        @ray.remote(num_cpus=0.5)
        class Worker:
            def work(self, unit):
                if unit == "bad":
                    raise ValueError("a bad unit")
                return ray.get_runtime_context().get_actor_id()

        made, kept = [], []

        def make():
            made.append(Worker.remote())
            return made[-1]

        def pool(units, n_actors=2):
            seen = set()
            run_pool(make_actor=make, n_actors=n_actors, units=units, call=lambda actor, unit: actor.work.remote(unit),
                     on_result=lambda unit, actor_id: seen.add(actor_id) or 1, max_retries=0, desc="kept", kept=kept)
            return seen

        first = pool([1, 2, 3, 4])
        assert len(made) == 2 and len(kept) == 2 and len(first) == 2
        assert pool([5, 6, 7]) <= first and len(made) == 2, "the second pool ran on the first pool's actors"
        assert len(pool([8], n_actors=1)) == 1 and len(kept) == 2, "an actor the pool did not need stays kept"
        with pytest.raises(ValueError, match="a bad unit"):
            pool(["bad", 9])
        assert kept == [] and len(made) == 2
        for actor in made:  # ray.kill returns before the actor is gone: ask until it answers no more
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    ray.get(actor.work.remote(1), timeout=30)
                except RayActorError:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("an actor of the failed pool still answers")
    finally:
        ray.shutdown()


def test_jobs_are_dealt_heaviest_first_to_the_lightest_group_and_keep_their_order():
    jobs = ["a", "B", "c", "D", "e", "F"]
    weight = {"a": 1, "c": 1, "e": 1, "B": 3, "D": 3, "F": 3}.__getitem__
    shares = deal(jobs, 2, weight)
    assert sorted(sum(shares, [])) == sorted(jobs)
    assert [sum(map(weight, share)) for share in shares] == [6, 6]
    assert all(share == sorted(share, key=jobs.index) for share in shares)
    assert deal(jobs, 1, weight) == [jobs]
    assert deal(["a"], 3, weight) == [["a"]], "no empty group"
