"""Fault injection for the tests of fault tolerance: a unit of work, in whatever process runs it, dies
or hangs where FAULT_ENV says. Here, below every stage, so a technique's own unit of work can call it."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

FAULT_ENV = "SELFEXPLAIN_GT_FAULT"
"""Fault injection for tests: comma-separated "<action>:<unit>:<marker file>", each done once (the marker
records it, with the node it happened on). kill: write half a unit's output, then exit hard. hang: stop
before writing (until the actor's node is removed)."""


def inject_fault(unit: int, write_partial: Callable[[], None]) -> None:
    """In an actor, before unit `unit` writes its output: the fault FAULT_ENV asks for, if any."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        action, index, marker = spec.split(":", 2)
        if int(index) != unit or Path(marker).exists():
            continue
        import ray

        Path(marker).write_text(ray.get_runtime_context().get_node_id())
        if action == "kill":
            write_partial()  # never renamed into place
            os._exit(1)
        if action == "hang":
            while True:
                time.sleep(1)
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r} (kill or hang)")
