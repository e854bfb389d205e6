"""Stopping a training job cleanly, and crashing it on purpose in tests.

SLURM and Kubernetes preempt with SIGTERM (then SIGKILL after a grace period, 30 s by default).
`PreemptionWatch` turns SIGTERM into a flag; the training loop asks every step whether any rank has
it and, if so, every rank writes a checkpoint at the step just finished and the job exits with 143
(128 + SIGTERM), so a resubmitted job loses no finished step. Signal handlers can only be set from a
process's main thread: under torchrun, `python -m selfexplain.training.step` or the in-process path the loop's
own process catches SIGTERM. Under Ray Train the loop runs in a worker thread, so the driver catches it
and writes each running job's stop file (`relay_to`), which the ranks read as the same signal.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Optional, Sequence

TRAIN_FAULT_ENV = "SELFEXPLAIN_TRAIN_FAULT"
"""Fault injection for tests: "RANK:STEP:MARKER" makes that rank exit hard right after optimizer step
STEP, once (the marker file records that it happened)."""

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class TrainingPreempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; exits with 143."""

    def __init__(self, step: Optional[int]):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step  # None in a driver whose ranks ran elsewhere


class PreemptionWatch:
    """Context manager: while active, SIGTERM sets a flag instead of killing the process (main thread
    only; elsewhere it installs nothing and the flag stays down). A training loop passes its job's
    `stop_file` (read as the same signal); a driver whose ranks run elsewhere passes their stop files as
    `relay_to` (written on SIGTERM)."""

    def __init__(self, stop_file: Optional[Path] = None, relay_to: Sequence[Path] = ()) -> None:
        self._caught = False
        self.stop_file = stop_file
        self.relay_to = list(relay_to)
        self._previous: Optional[object] = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self._caught = True
        for path in self.relay_to:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("SIGTERM\n")

    @property
    def signalled(self) -> bool:
        """SIGTERM reached this process, or the driver wrote the stop file."""
        return self._caught or (self.stop_file is not None and self.stop_file.exists())

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def any_rank_signalled(self, world: int, device="cpu") -> bool:
        """Whether SIGTERM reached any rank (a collective: every rank calls it every step, so all ranks
        stop at the same step even when the signal reached only one). `device`: the engine's, since
        NCCL reduces device tensors only."""
        if world == 1:
            return self.signalled
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0


def crash_if_injected(rank: int, step: int) -> None:
    """Exit hard (no cleanup, as a killed process would) if TRAIN_FAULT_ENV names this rank and step."""
    spec = os.environ.get(TRAIN_FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if int(fault_rank) != rank or int(fault_step) != step or Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} crashed after step {step}\n")
    os._exit(1)
