"""Checkpoint manager: atomic save (temp dir + COMPLETE marker + rename), latest-complete selection that never
picks a half-written directory, keep_last pruning, and DCP resharding of uneven (vocab-sized) DTensor shards from
TP=4 to TP=2 and 3 — compared against the full tensor built in the test.
Run: pytest tests/test_checkpoint.py
"""
import json
import shutil

import pytest
import torch
import torch.distributed as dist

from dist import init_gloo, run_ranks
from megaent.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

V, H = 1001, 6
FULL = torch.arange(V * H, dtype=torch.float32).reshape(V, H)


def test_atomic_save_latest_and_prune(tmp_path):
    init = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {k: v * step for k, v in init.items()}, {"data": {"index": step}},
                        keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # A crash mid-save leaves a temp dir and an unmarked dir: neither is ever picked.
    (tmp_path / "checkpoints" / ".tmp-step_000009").mkdir()
    half = tmp_path / "checkpoints" / "step_000010"
    shutil.copytree(tmp_path / "checkpoints" / "step_000003", half)
    (half / "COMPLETE").unlink()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000003"
    out = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    meta = load_checkpoint(latest, out)
    assert meta["step"] == 3 and meta["data"] == {"index": 3}
    assert torch.equal(out["w"], init["w"] * 3) and torch.equal(out["b"], init["b"] * 3)
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        load_checkpoint(half, out)
    # The next save removes stale temp dirs.
    save_checkpoint(tmp_path, 4, out, {}, keep_last=2)
    assert not (tmp_path / "checkpoints" / ".tmp-step_000009").exists()
    assert json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["step"] == 4


def _dtensor(tp, zero=False):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    world = dist.get_world_size()
    mesh = DeviceMesh("cpu", torch.arange(world).reshape(world // tp, tp), mesh_dim_names=("dp", "tp"))
    local = torch.chunk(FULL, tp, 0)[dist.get_rank() % tp].clone()
    if zero:
        local.zero_()
    return DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False, shape=FULL.shape,
                              stride=FULL.stride())


def _save(rank, world, path):
    init_gloo()
    save_checkpoint(path, 5, {"w": _dtensor(4)}, {"layout": "tp4"}, rank=rank)


def _load(rank, world, path, tp):
    init_gloo()
    sd = {"w": _dtensor(tp, zero=True)}
    load_checkpoint(latest_checkpoint(path), sd, rank=rank, restore_rng=False)
    return torch.equal(sd["w"].to_local(), torch.chunk(FULL, tp, 0)[rank % tp])


@pytest.mark.slow
def test_dcp_reshards_uneven_vocab(tmp_path):
    run_ranks(_save, 4, str(tmp_path))
    assert run_ranks(_load, 2, str(tmp_path), 2) == [True, True]
    assert run_ranks(_load, 3, str(tmp_path), 3) == [True, True, True]
