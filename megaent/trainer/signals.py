"""Stop requests from the scheduler: SIGTERM / SIGUSR1 -> checkpoint at the next safe point, then exit.

Slurm sends USR1 before the time limit (`--signal=USR1@N`) and TERM on cancel or requeue. The handler only
sets a flag; the training loop checks it between steps (a safe point: no collective in flight), agrees on it
across ranks (any rank signalled -> all stop), checkpoints and exits cleanly.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist


class StopFlag:
    """Set by SIGTERM/SIGUSR1; `should_stop(group)` is the all-rank decision (1 all-reduce)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def should_stop(self, group: Optional[dist.ProcessGroup] = None) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)
