"""`python -m megaent.trainer.torchrun [torchrun options] -m megaent.cli train ...`: torchrun whose exit code says
"requeue me" (3) when every local rank checkpointed on a stop signal.

torchrun itself exits 1 in that case: a TERM to torchrun ends its agent with `SignalException` after it forwarded
the signal and waited for the workers, and workers that exit 3 count as failed children. This wrapper runs
torchrun's own `main` in-process with `MEGAENT_REQUEUE_DIR` pointing at a fresh directory; each rank that returns
3 from `megaent.trainer.run.train` (its checkpoint written) leaves a marker there, and when all LOCAL_WORLD_SIZE
markers are present the wrapper exits 3, whatever torchrun concluded. Any other outcome is torchrun's.
It also forwards USR1 (Slurm's "time is nearly up"), which torchrun's agent does not handle, to the workers.
torchrun gives workers 30 s after the TERM before it kills them: a checkpoint must be written within that time.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from megaent.trainer.run import EXIT_REQUEUE, REQUEUE_DIR_ENV


def _children() -> list[int]:
    pids: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _forward(signum: int, frame: object) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def all_requeued(where: Path) -> bool:
    """True when every local rank left its marker (the marker holds LOCAL_WORLD_SIZE)."""
    markers = list(where.glob("requeue-*"))
    return bool(markers) and len(markers) == int(markers[0].read_text() or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.run import main as torchrun_main

    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGUSR1, _forward)
    with tempfile.TemporaryDirectory(prefix="megaent-requeue-") as where:
        os.environ[REQUEUE_DIR_ENV] = where
        try:
            torchrun_main(argv)
        except BaseException:  # SignalException, ChildFailedError, SystemExit: torchrun's verdict unless ...
            if all_requeued(Path(where)):  # ... every rank checkpointed and asked for a requeue
                return EXIT_REQUEUE
            raise
        return EXIT_REQUEUE if all_requeued(Path(where)) else 0


if __name__ == "__main__":
    sys.exit(main())
