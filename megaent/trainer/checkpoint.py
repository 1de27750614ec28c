"""Atomic, layout-independent checkpoints with torch.distributed.checkpoint (DCP).

Layout on disk (inside the run directory):

    checkpoints/step_000040/      DCP shards (model + optimizer in canonical HF names) + meta.json + COMPLETE
    checkpoints/.tmp-step_000050  a save in progress: never picked by `latest_checkpoint`

Every rank writes its own shards into the temporary directory; after a barrier rank 0 writes `meta.json`
(step, data position, layout, trainer state) and the `COMPLETE` marker, fsyncs, and renames the directory to
its final name (atomic on POSIX). A run killed at any point leaves either a complete checkpoint or a `.tmp-*`
directory that resume ignores and the next save removes.

Layout independence: tensors are saved as DTensors in the canonical (HF-named, unpadded) global shapes, sharded
over the tensor-parallel mesh dimension and replicated over data parallel, so DCP reshards on load to any
TP x PP layout (verified for uneven vocab splits). Per-rank RNG states are saved too; on an unchanged layout
resume restores them exactly.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / "COMPLETE").is_file() and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint, or None. Half-written (`.tmp-*` or unmarked) directories are never picked."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], *,
                    rank: int = 0, keep_last: int = 2) -> Path:
    """Collective: every rank calls it with its DCP state dict `tensors`; rank 0's `meta` is written."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
        with open(tmp / "COMPLETE", "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    _barrier()
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint (step, data position, layout, ...)."""
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(path: str | Path, tensors: dict[str, Any], *, rank: int = 0,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Collective: fill `tensors` (DCP state dict, resharded to this layout) in place; return meta."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker); pick another")
    dcp.load(tensors, checkpoint_id=str(path))
    meta = read_meta(path)
    rng_file = path / f"rng_rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
