"""A pool of Ray actors working through a list of units, surviving actor deaths.

Ray schedules the actors and restarts nothing by itself here: when an actor dies (killed, OOM, node
lost) the pool kills its handle, starts a replacement and puts the unit back at the head of the
queue, up to `max_retries` times per unit. An exception raised by the unit's own code is not retried:
it is a bug or bad input and fails the stage at once with its message.

Progress goes to a tqdm bar, to Ray metrics (the dashboard's Metrics view, Prometheus/Grafana):
selfexplain_units_done / _units_total / _records_per_second gauges and selfexplain_records /
_unit_retries counters, tagged with the pool's stage (e.g. "groundtruth input_ablation/smollm2"), and to
the pipeline's W&B run (tracking.log_progress).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

from .tracking import log_progress

class PoolMetrics:
    """A pool's progress as Ray metrics, tagged with its stage."""

    def __init__(self, stage: str, total: int):
        from ray.util.metrics import Counter, Gauge

        tags = ("stage",)
        self.units_done = Gauge("selfexplain_units_done", "Units (shards, eval groups) finished", tag_keys=tags)
        self.units_total = Gauge("selfexplain_units_total", "Units the stage has to finish", tag_keys=tags)
        self.rate = Gauge("selfexplain_records_per_second", "Records per second since the stage started", tag_keys=tags)
        self.records = Counter("selfexplain_records", "Records produced", tag_keys=tags)
        self.retries = Counter("selfexplain_unit_retries", "Units redone after their actor died", tag_keys=tags)
        for metric in (self.units_done, self.units_total, self.rate, self.records, self.retries):
            metric.set_default_tags({"stage": stage})
        self.units_total.set(total)
        self.units_done.set(0)
        self.stage, self.total, self.retried, self.produced = stage, total, 0, 0

    def update(self, done: int, new_records: int, rate: float) -> None:
        self.units_done.set(done)
        if new_records:
            self.records.inc(new_records)
        self.rate.set(rate)
        self.produced += new_records
        log_progress(self.stage, {"units_done": done, "units_total": self.total, "records": self.produced,
                                  "records_per_s": rate, "retries": self.retried})

    def retry(self) -> None:
        self.retries.inc()
        self.retried += 1


class _Progress:
    """A pool's progress bar and Ray metrics, fed one finished unit at a time."""

    def __init__(self, desc: str, total: int, unit_name: str):
        self.bar = tqdm(total=total, desc=desc, unit=unit_name, dynamic_ncols=True)
        self.metrics = PoolMetrics(desc, total)
        self.records, self.started = 0, time.time()

    def done(self, produced: int) -> None:
        self.records += produced
        rate = self.records / max(time.time() - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(records=self.records, rate=f"{rate:.1f}/s")
        self.metrics.update(self.bar.n, produced, rate)


def _first_actors(kept: list, wanted: int, make_actor: Callable[[], Any]) -> tuple[list, list]:
    """(the pool's starting actors: kept ones first, then new ones; the kept ones it does not need),
    emptying `kept`."""
    idle, spare = kept[:wanted], kept[wanted:]
    kept.clear()
    return idle + [make_actor() for _ in range(wanted - len(idle))], spare


def run_pool(
    make_actor: Callable[[], Any],
    n_actors: int,
    units: Sequence[Any],
    call: Callable[[Any, Any], Any],
    on_result: Callable[[Any, Any], int],
    max_retries: int,
    desc: str,
    unit_name: str = "shard",
    kept: Optional[list] = None,
) -> None:
    """Run call(actor, unit) for every unit on up to n_actors actors; on_result(unit, result) returns
    the number of records the unit produced (for the records/s shown on the progress bar). `kept`: live
    actors of an earlier pool of the same kind, used first; once every unit is done the healthy actors are
    left in it for the next pool instead of being killed (on an error every actor is killed)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    if not units:
        return
    kept = [] if kept is None else kept
    queue, failures = deque(range(len(units))), [0] * len(units)
    idle, spare = _first_actors(kept, min(n_actors, len(units)), make_actor)
    running: dict = {}
    progress, finished = _Progress(desc, len(units), unit_name), False
    try:
        while queue or running:
            while idle and queue:
                actor, index = idle.pop(), queue.popleft()
                running[call(actor, units[index])] = (actor, index)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as err:  # the unit's own code raised: not a fault to retry
                idle.append(actor)  # alive: killed below with the others
                raise err.as_instanceof_cause() from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                failures[index] += 1
                if failures[index] > max_retries:
                    raise RuntimeError(f"{desc}: unit {index} lost its actor {failures[index]} times; last: {err}") from err
                tqdm.write(f"[{desc}] actor died on unit {index} ({type(err).__name__}); retrying on a new actor")
                progress.metrics.retry()
                ray.kill(actor, no_restart=True)
                idle.append(make_actor())
                queue.appendleft(index)
                continue
            progress.done(on_result(units[index], result))
            idle.append(actor)
        finished = True
    finally:
        progress.bar.close()
        if finished:
            kept.extend(idle + spare)
        else:
            for actor in idle + spare + [a for a, _ in running.values()]:
                ray.kill(actor, no_restart=True)
