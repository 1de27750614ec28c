"""Push the trainer's weights to the rollout engine after an update.

- `sync_weights_disk(policy, state, path, clients)`: `megaent.model.save_hf` to a
  path every server can read (collective: call on every rank), then rank 0
  runs SGLang's pause / flush / update / continue sequence on every server
  (`SGLangClient.sync_weights_from_disk`: /pause_generation mode "retract",
  /flush_cache, `/update_weights_from_disk {"model_path": path}`,
  /continue_generation; works for `megaent serve` and SGLang alike).
- `sync_weights(engine, policy, state, path=...)`: picks the route: an
  `EmbeddedEngine` that shares the training policy needs nothing (no-op); an
  HTTP client goes through disk.
- `NcclWeightSync`: SGLang's tensor route over a NCCL group shared by trainer
  rank 0 and the servers (`POST /init_weights_update_group`, then per bucket
  `POST /update_weights_from_distributed` while rank 0 broadcasts the tensors).
  Request fields follow SGLang's io_struct.py `InitWeightsUpdateGroupReqInput`
  (master_address, master_port, rank_offset, world_size, group_name, backend)
  and `UpdateWeightsFromDistributedReqInput` (names, dtypes, shapes,
  group_name, flush_cache, weight_version). It needs CUDA, NCCL and SGLang
  servers; `megaent serve` does not implement it.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megaent.rollout.client import SGLangClient
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.types import RolloutError

log = logging.getLogger(__name__)


def sync_weights_disk(policy: Any, state: Any, path: Union[str, Path],
                      clients: Union[SGLangClient, Sequence[SGLangClient], None], *,
                      weight_version: Optional[str] = None) -> Path:
    """save_hf on all ranks (collective), then rank 0 asks every server to reload from `path`."""
    from megaent.model import save_hf

    out = save_hf(policy, state, path)
    if state.rank == 0 and clients is not None:
        for c in ([clients] if isinstance(clients, SGLangClient) else clients):
            c.sync_weights_from_disk(str(out), weight_version=weight_version)
    return Path(out)


def sync_weights(engine: Any, policy: Any, state: Any, *, path: Optional[Union[str, Path]] = None,
                 weight_version: Optional[str] = None) -> str:
    """Bring `engine` up to date with `policy`; returns the route taken ("shared", "disk")."""
    if isinstance(engine, EmbeddedEngine):
        if engine.policy is policy:
            return "shared"
        raise RolloutError("the embedded engine holds a different policy object than the trainer; build it with "
                           "EmbeddedEngine(policy, state) on the training policy so sync is free")
    if isinstance(engine, SGLangClient):
        if path is None:
            raise RolloutError("weight sync over disk needs a shared path (the run directory's rollout_weights/)")
        sync_weights_disk(policy, state, path, engine, weight_version=weight_version)
        return "disk"
    raise RolloutError(f"do not know how to sync weights into {type(engine).__name__}")


def _require_nccl() -> None:
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise RolloutError("rollout.weight_sync=nccl needs CUDA GPUs, an NCCL build of torch and SGLang servers; "
                           "use rollout.weight_sync=disk on CPU or with megaent serve")


class NcclWeightSync:
    """Trainer rank 0 side of SGLang's distributed weight update (GPU only; see the module docstring).

    world_size = 1 (trainer rank 0) + the total TP ranks of all servers; server k
    gets rank_offset 1 + k * server_tp.
    """

    def __init__(self, client: SGLangClient, *, master_address: str, master_port: int, server_tp: int = 1,
                 group_name: str = "megaent_weight_sync", bucket_bytes: int = 512 * 2**20,
                 timeout_s: float = 600.0) -> None:
        _require_nccl()
        self.client = client
        self.master_address, self.master_port = master_address, master_port
        self.server_tp = server_tp
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.world_size = 1 + server_tp * len(client.servers)
        self.group: Optional[dist.ProcessGroup] = None

    async def _post_each(self, path: str, bodies: list[dict]) -> list[Any]:
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            rs = await asyncio.gather(*(http.post(s.url + path, json=b) for s, b in zip(self.client.servers, bodies)))
        for s, r in zip(self.client.servers, rs):
            if r.status_code != 200:
                raise RolloutError(f"{s.url}{path} failed (HTTP {r.status_code}): {r.text[:500]}")
        return [r.json() for r in rs]

    def init_group(self) -> None:
        """Servers join the group (HTTP) while trainer rank 0 joins as rank 0 (one rendezvous)."""
        bodies = [{"master_address": self.master_address, "master_port": self.master_port,
                   "rank_offset": 1 + k * self.server_tp, "world_size": self.world_size,
                   "group_name": self.group_name, "backend": "nccl"} for k in range(len(self.client.servers))]

        async def run() -> None:
            req = asyncio.create_task(self._post_each("/init_weights_update_group", bodies))
            self.group = await asyncio.to_thread(self._join)
            await req
        asyncio.run(run())

    def _join(self) -> dist.ProcessGroup:
        # A second, independent NCCL group over a TCP store, the way SGLang's
        # init_custom_process_group (adapted from vLLM / OpenRLHF) builds its side.
        from torch.distributed.distributed_c10d import _new_process_group_helper, _world

        store = dist.TCPStore(self.master_address, self.master_port, self.world_size, is_master=True,
                              timeout=timedelta(seconds=self.timeout_s))
        store = dist.PrefixStore(self.group_name, store)
        pg, _ = _new_process_group_helper(self.world_size, 0, [], "nccl", store, group_name=self.group_name,
                                          timeout=timedelta(seconds=self.timeout_s))
        _world.pg_group_ranks[pg] = {i: i for i in range(self.world_size)}
        return pg

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, weight_version: Optional[str] = None
             ) -> None:
        """Send full HF-named tensors (on this GPU) in buckets: HTTP metadata + NCCL broadcast from rank 0."""
        if self.group is None:
            raise RolloutError("call init_group() before push()")
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, t in named_tensors:
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                self._send(bucket, weight_version=None)
                bucket, size = [], 0
        if bucket:
            self._send(bucket, weight_version=weight_version)

    def _send(self, bucket: list[tuple[str, torch.Tensor]], *, weight_version: Optional[str]) -> None:
        body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name, "flush_cache": True}
        if weight_version is not None:
            body["weight_version"] = weight_version

        async def run() -> None:
            req = asyncio.create_task(self._post_each("/update_weights_from_distributed",
                                                      [body] * len(self.client.servers)))

            def bcast() -> None:
                for _, t in bucket:
                    dist.broadcast(t.contiguous(), src=0, group=self.group)
            await asyncio.to_thread(bcast)
            await req
        asyncio.run(run())
