"""What a resume trusts in a checkpoint directory: nothing it has not checked.

- Digests: `digests.json` lists the SHA-256 of every file the save wrote (DCP shards, `.metadata`, RNG states,
  `meta.json`, `config.yaml`); `verify` recomputes them, split over the ranks, before anything is loaded.
- No unpickling of checkpoint bytes: DCP keeps its `.metadata` as a pickle, which `SafeReader` reads through
  `MetadataUnpickler`, a `pickle.Unpickler` whose `find_class` admits only DCP's own metadata classes and the
  few torch/pathlib types they hold (the pattern of the Python docs' "Restricting Globals"). DCP reads a
  non-tensor entry with `torch.load(weights_only=False)`, so `check_tensor_entries` also refuses a checkpoint
  whose metadata declares one of our tensor keys as bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata

DIGESTS = "digests.json"
UNHASHED = {DIGESTS, "COMPLETE"}  # written after the digests; COMPLETE holds no data


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the directory, the problem and the fix."""


# ------------------------------------------------------------------ digests
def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def own_files(directory: Path, rank: int) -> list[Path]:
    """Files of `directory` this rank wrote: its DCP shards (`__{rank}_*.distcp`), its RNG state, and on rank 0
    DCP's `.metadata`."""
    mine = [p for p in directory.iterdir() if p.name.startswith(f"__{rank}_") or p.name.startswith(f"rng_rank{rank}.")]
    if rank == 0 and (directory / ".metadata").is_file():
        mine.append(directory / ".metadata")
    return sorted(mine)


def gather_digests(directory: Path, rank: int) -> dict[str, str]:
    """Collective: every rank hashes the files it wrote; the union (on every rank)."""
    mine = {p.name: file_digest(p) for p in own_files(directory, rank)}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def write_digests(directory: Path, digests: dict[str, str]) -> None:
    """Rank 0: add the digests of the small files rank 0 wrote last (meta.json, config.yaml) and write them."""
    for name in ("meta.json", "config.yaml"):
        if (directory / name).is_file():
            digests[name] = file_digest(directory / name)
    (directory / DIGESTS).write_text(json.dumps(dict(sorted(digests.items())), indent=1))


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def verify(directory: Path, *, names: Optional[list[str]] = None) -> Optional[str]:
    """Collective: recompute the digests (files split over the ranks); None when intact, else what is wrong
    (the same answer on every rank). `names` restricts the check to those files (e.g. the config only)."""
    path = directory / DIGESTS
    try:
        want = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path} is missing"
    except (ValueError, OSError):
        want = None
    if not isinstance(want, dict):
        return f"{path} is not a JSON digest table"
    todo = sorted(n for n in want if names is None or n in names)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    problems = []
    for name in todo[rank::world]:
        f = directory / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif file_digest(f) != want[name]:
            problems.append(f"{name} does not match its SHA-256 digest")
    found = sorted(p for part in _all_gather(problems) for p in part)
    return "; ".join(found) if found else None


# ------------------------------------------------------------------ DCP metadata without arbitrary unpickling
_TORCH_TYPES = {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided & co
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file; any other global (a function to call, a class to build) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _TORCH_TYPES:
            return getattr(torch, name)
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP's metadata")


def read_metadata(directory: Path) -> Any:
    """DCP's `Metadata` of a checkpoint directory, through `MetadataUnpickler`. Raises CheckpointError."""
    path = directory / ".metadata"
    try:
        md = MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: refused ({exc}); a DCP metadata file holds only DCP's metadata classes. "
                              "Delete this checkpoint directory; resume falls back to the previous one") from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
    return md


class SafeReader(FileSystemReader):
    """`FileSystemReader` whose metadata comes from `read_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        md = read_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def check_tensor_entries(directory: Path, tensors: dict[str, Any]) -> None:
    """Refuse a checkpoint whose metadata declares one of the tensor keys we load as bytes (DCP would unpickle
    those bytes with `torch.load(weights_only=False)`)."""
    md = read_metadata(directory)
    bad = sorted(k for k, v in tensors.items() if isinstance(v, torch.Tensor)
                 and isinstance(md.state_dict_metadata.get(k), dcp_metadata.BytesStorageMetadata))
    if bad:
        raise CheckpointError(f"{directory}: entries {bad[:3]} are stored as pickled bytes where a tensor belongs; "
                              "refusing to unpickle them")
