"""Atomic, verified, layout-independent checkpoints with torch.distributed.checkpoint (DCP).

Layout on disk (inside the run directory):

    checkpoints/step_000040/      DCP shards (model + optimizer in canonical HF names), .metadata, rng_rank*.safetensors,
                                  meta.json, config.yaml (the run's config at this step), digests.json, COMPLETE
    checkpoints/.tmp-step_000050  a save in progress: never picked by `latest_checkpoint`

Every rank writes its own shards and RNG state into the temporary directory and hashes them; rank 0 writes
`meta.json`, `config.yaml`, `digests.json` (SHA-256 of every file) and the `COMPLETE` marker, fsyncs, and renames
the directory to its final name (atomic on POSIX). A run killed at any point leaves either a complete checkpoint
or a `.tmp-*` directory that resume ignores and the next save removes. A save that fails (a full disk) removes its
temporary directory and raises `CheckpointError` saying so.

Resume (`load_latest`) trusts nothing it reads: digests are checked before loading (`verify=False` skips that),
DCP's metadata is read without arbitrary unpickling and RNG states are plain tensors (`megaent.trainer.integrity`);
a damaged newest checkpoint falls back, with a warning, to the newest intact one.

Layout independence: tensors are saved as DTensors in the canonical (HF-named, unpadded) global shapes, sharded
over the tensor-parallel mesh dimension and replicated over data parallel, so DCP reshards on load to any
TP x PP layout (verified for uneven vocab splits). Per-rank RNG states are saved too; on an unchanged layout
resume restores them exactly.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megaent.trainer.atomic import fsync_dir, write_text_atomic
from megaent.trainer.integrity import (
    DIGESTS, CheckpointError, SafeReader, check_tensor_entries, gather_digests, verify, write_digests,
)

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT = 2  # 2: digests.json, RNG as safetensors, config.yaml inside


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


# ------------------------------------------------------------------ RNG state as plain tensors
def rng_state() -> dict[str, torch.Tensor]:
    """torch, Python and NumPy global RNG states as int tensors (safetensors: nothing to unpickle)."""
    version, py_keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    assert version == 3 and kind == "MT19937", (version, kind)
    return {"torch": torch.get_rng_state(), "python": torch.tensor(py_keys, dtype=torch.int64, device="cpu"),
            "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64, device="cpu"),
            "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": torch.tensor([pos], dtype=torch.int64, device="cpu"),
            "numpy_gauss": torch.tensor([has_gauss, cached], dtype=torch.float64, device="cpu")}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    has, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss if has else None))
    np_has, cached = state["numpy_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"][0]),
                         int(np_has), float(cached)))


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank}.safetensors"


# ------------------------------------------------------------------ save
def _describe_write_failure(exc: BaseException, root: Path) -> str:
    """One line for a failed save; a full disk (or quota, or file-size limit) says so instead of torch's
    "unexpected pos"."""
    texts, seen = [], set()
    stack: list[Any] = [exc]
    full = False
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts.append(str(e))
        full |= isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        failures = getattr(e, "failures", None)
        inner = [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()] if failures else []
        stack.extend([e.__cause__, e.__context__, *inner])
    text = " ".join(texts)
    full |= any(s in text for s in ("No space left", "Disk quota", "File too large", "unexpected pos",
                                    "file write failed"))
    if full:
        try:
            free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return (f"the disk is full ({free} on {root}); free space there or lower trainer.keep_last, then resume "
                "(megaent train --resume RUN_DIR)")
    last = [t.strip().splitlines()[-1] for t in texts if t.strip()]  # DCP's text ends with the cause
    return f"{type(exc).__name__}: {last[0] if last else ''}"


def _agree(error: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error, or None when every rank succeeded."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _write_shards(tmp: Path, tensors: dict[str, Any], rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    dcp.save(tensors, checkpoint_id=str(tmp))
    save_file(rng_state(), str(_rng_file(tmp, rank)))


def _finish(tmp: Path, final: Path, root: Path, meta: dict[str, Any], config: Optional[str],
            digests: dict[str, str]) -> None:
    """Rank 0: meta.json, config.yaml, digests.json, COMPLETE, fsync, rename."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    if config is not None:
        (tmp / "config.yaml").write_text(config)
    write_digests(tmp, digests)
    with open(tmp / "COMPLETE", "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], *,
                    rank: int = 0, keep_last: int = 2) -> Path:
    """Collective: every rank calls it with its DCP state dict `tensors`; rank 0's `meta` is written.

    `meta["config"]` (YAML text), when present, becomes the checkpoint's `config.yaml`, and the run directory's
    `config.yaml` is rewritten from it (atomically) once the checkpoint is complete. Raises CheckpointError
    (on every rank) when writing fails; the temporary directory is removed first."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    meta = dict(meta)
    config = meta.pop("config", None)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    error = None
    try:
        _write_shards(tmp, tensors, rank)
    except (Exception, CheckpointException) as exc:  # a full disk, an I/O error: reported on every rank below
        error = _describe_write_failure(exc, root)
    error = _agree(error)
    digests = gather_digests(tmp, rank) if error is None else {}
    if error is None and rank == 0:
        try:
            _finish(tmp, final, root, {"step": step, "format": FORMAT, **meta}, config, digests)
            if config is not None:
                write_text_atomic(Path(run_dir) / "config.yaml", config)
        except Exception as exc:
            error = _describe_write_failure(exc, root)
    error = _agree(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(f"checkpoint {final}: writing failed: {error}; the partial directory was removed")
    if rank == 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    _barrier()
    return final


# ------------------------------------------------------------------ load
def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint (step, data position, layout, ...). Raises CheckpointError."""
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{file}: not a megaent checkpoint's meta (no integer `step`)")
    return meta


def check_checkpoint(path: Path, *, verify_digests: bool = True, names: Optional[list[str]] = None) -> Optional[str]:
    """Collective: None when `path` can be trusted, else what is wrong with it (same answer on every rank)."""
    if not (path / "COMPLETE").is_file():
        return "no COMPLETE marker"
    try:
        meta = read_meta(path)
    except CheckpointError as exc:
        return str(exc)
    if not verify_digests:
        return None
    if not (path / DIGESTS).is_file() and meta.get("format", 1) < FORMAT:
        log.warning("checkpoint %s predates digests (format 1): loaded unverified", path)
        return None
    return verify(path, names=names)


def load_checkpoint(path: str | Path, tensors: dict[str, Any], *, rank: int = 0, restore_rng: bool = True,
                    verify_digests: bool = True) -> dict[str, Any]:
    """Collective: check `path`, fill `tensors` (DCP state dict, resharded to this layout) in place; return meta.
    Raises FileNotFoundError for an incomplete directory, CheckpointError for a damaged one."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker); pick another")
    problem = check_checkpoint(path, verify_digests=verify_digests)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    check_tensor_entries(path, tensors)
    dcp.load(tensors, storage_reader=SafeReader(str(path)))
    meta = read_meta(path)
    if restore_rng:
        _restore_rng(path, rank)
    return meta


def _restore_rng(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    file = _rng_file(path, rank)
    if not file.is_file():
        if (path / f"rng_rank{rank}.pt").is_file():
            log.warning("%s: RNG state in the old pickled format is not loaded (it could run code); the random "
                        "stream continues from this process's seed instead", path)
        return
    set_rng_state(load_file(str(file)))


def checkpoint_config(path: Path) -> Optional[Path]:
    """The run config a checkpoint carries (`config.yaml`) when it is there and matches its digest."""
    file = path / "config.yaml"
    if not file.is_file() or check_checkpoint(path, names=["config.yaml", "meta.json"]) is not None:
        return None
    return file


def load_latest(run_dir: str | Path, tensors: dict[str, Any], *, rank: int = 0, layout: Optional[dict] = None,
                verify_digests: bool = True) -> Optional[tuple[Path, dict[str, Any]]]:
    """Collective: load the newest intact checkpoint of `run_dir` into `tensors`; (path, meta), or None when
    the run has no complete checkpoint. A damaged one is skipped with a warning; RNG states are restored when
    the checkpoint's layout equals `layout`. Raises CheckpointError when every checkpoint is damaged."""
    found = list_checkpoints(run_dir)
    skipped = []
    for _, path in reversed(found):
        try:
            same_layout = read_meta(path).get("layout", {}) == layout
            meta = load_checkpoint(path, tensors, rank=rank, restore_rng=same_layout, verify_digests=verify_digests)
        except CheckpointError as exc:
            problem = str(exc)
        except (Exception, CheckpointException) as exc:  # unverified damage surfacing inside DCP (all ranks)
            problem = f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            if skipped and rank == 0:
                log.warning("resumed from %s, an older checkpoint than %s", path, skipped[0])
            return path, meta
        skipped.append(path)
        if rank == 0:
            log.warning("checkpoint %s cannot be used (%s); falling back to the previous one", path, problem)
    if skipped:
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: no intact checkpoint ({len(skipped)} damaged, see the "
                              "warnings); move the checkpoints directory away to start the run over")
    return None
