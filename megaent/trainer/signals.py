"""Stop requests from the scheduler: SIGTERM / SIGUSR1 -> checkpoint at the next safe point, then exit 3.

Slurm sends USR1 before the time limit (`--signal=USR1@N`) and TERM on cancel or requeue. The handler only
sets a flag; the training loop checks it between steps (a safe point: no collective in flight), agrees on it
across ranks (any rank signalled -> all stop), checkpoints and exits cleanly.

Two gaps the handler alone leaves are closed here:
- Before the handler: `megaent train` calls `record_early()` first thing, before its slow imports (torch,
  megatron-core); a signal then is kept and `StopFlag.install` takes it over, so it stops the run like a later
  one instead of killing the process.
- During shutdown: once a stop was requested, `uninstall` leaves a recorder in place instead of the default
  action, so a second TERM/USR1 while the run tears down cannot turn the requeue exit code 3 into death by signal.

This module imports no torch at load time (it runs before those imports).
"""
from __future__ import annotations

import signal
from typing import Any, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []  # signals recorded by `record_early` before any StopFlag was installed


def _record_early(signum: int, frame: object) -> None:
    _early.append(signum)


def record_early() -> None:
    """Keep TERM/USR1 that arrive before the trainer's handler is installed (called at process start)."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _record_early)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; `should_stop(group)` is the all-rank decision (1 all-reduce)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            prev = signal.signal(sig, self._handle)
            self._previous[sig] = signal.SIG_DFL if prev is _record_early else prev
        if _early and self.signum is None:
            self.signum = _early[0]
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers, unless a stop was requested: then signals keep being recorded (the
        process is on its way to exit 3, which the job script reads as "requeue me")."""
        if self.signum is None:
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def should_stop(self, group: Any = None) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device="cpu")  # host flag: gloo
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)
