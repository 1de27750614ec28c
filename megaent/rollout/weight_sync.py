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
- `DistWeightSync` (trainer rank 0) + `sync_weights_distributed` (every
  rank): SGLang's tensor route over a process group of trainer rank 0 and
  every server TP rank: `POST /init_weights_update_group` once, then per sync
  /pause_generation (retract), `/begin_weight_update`, per bucket
  `POST /update_weights_from_distributed` while rank 0 broadcasts the bucket,
  `/end_weight_update`, /continue_generation. NCCL on GPUs, gloo on CPU;
  `megaent serve` implements the server side (megaent.rollout.dist_update),
  so the whole path runs on CPU. Request fields follow SGLang's io_struct.py
  `InitWeightsUpdateGroupReqInput` (master_address, master_port, rank_offset,
  world_size, group_name, backend) and `UpdateWeightsFromDistributedReqInput`
  (names, dtypes, shapes, group_name, flush_cache, weight_version,
  load_format). A server without the session routes (SGLang before 0.5.23)
  gets the buckets without a session.

The tensors are HF-named full tensors made one at a time by `save_hf`'s own
per-parameter gather (TP shards gathered to TP rank 0 of the owning stage,
merged, sent to global rank 0), so rank 0 holds one bucket, never the model,
and nothing is written to disk.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

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


def iter_hf_tensors(policy: Any, state: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective (every rank iterates to the end): yields on global rank 0, one at a time, each HF tensor of
    the whole model [full HF shape] in the policy dtype on rank 0's device; other ranks yield nothing.

    `save_hf`'s gather, reused per tensor: per parameter one `gather` on tp_group (DP rank 0 only) and, for
    stages past the first, one send/recv to rank 0."""
    from megaent.model.hf_io import _export_plan, _gather_param, _to_rank0

    if state.dp_rank != 0:
        return
    params = policy.megaent_params() if hasattr(policy, "megaent_params") else dict(policy.named_parameters())
    for stage, specs in enumerate(_export_plan(policy)):
        for spec in specs:
            full = _gather_param(policy, state, spec, params, stage)
            for part in spec.parts:
                t = _to_rank0(state, full, part, stage, policy.dtype)
                if state.rank == 0:
                    yield part.hf_name, t


def sync_weights_distributed(policy: Any, state: Any, sender: Optional["DistWeightSync"], *,
                             weight_version: Optional[str] = None) -> None:
    """Collective: stream the policy's HF tensors to the servers through `sender` (rank 0's; None elsewhere).

    A server's rejection does not leave the other ranks waiting: rank 0 stops sending, still takes part in
    every gather, and the error is broadcast so every rank raises the same RolloutError (the servers keep
    their previous weights)."""
    tensors = iter_hf_tensors(policy, state)
    error: list[Optional[str]] = [None]
    if state.rank == 0:
        try:
            if sender is None:
                raise RolloutError("rank 0 needs a DistWeightSync to push weights over the process group")
            sender.push(tensors, weight_version=weight_version)
        except Exception as e:  # HTTP or a rejection: the other ranks must still finish the gathers
            error[0] = str(e) if isinstance(e, RolloutError) else f"weight sync failed: {type(e).__name__}: {e}"
    for _ in tensors:  # the rest of the gathers: the other ranks, or rank 0 after a failure
        pass
    if dist.is_initialized() and state.world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RolloutError(error[0])


async def _alongside(requests: Any, collective: Callable[[], Any]) -> Any:
    """Run the HTTP requests and the blocking `collective` (in a thread) together; returns its result.

    The first failure raises at once: a server that answers 4xx before joining the collective would
    otherwise leave this side waiting for the group's whole timeout. The collective's thread is a daemon
    (a collective cannot be cancelled); it ends when the group times out."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(fn: Callable, value: Any) -> None:
        if not done.done():
            fn(value)

    def work() -> None:
        try:
            r = collective()
            ok = True
        except BaseException as e:  # handed to the event loop, raised there
            r, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, done.set_result if ok else done.set_exception, r)
        except RuntimeError:  # the loop is gone: the requests already failed and were raised
            pass

    threading.Thread(target=work, daemon=True, name="megaent-weight-sync").start()
    req = asyncio.ensure_future(requests)
    await asyncio.wait({req, done}, return_when=asyncio.FIRST_EXCEPTION)
    if req.done() and req.exception() is not None:
        raise req.exception()
    result = await done
    await req
    return result


def backend_for(device: torch.device) -> str:
    """The weight-update group's backend: NCCL for GPU tensors, gloo for host ones."""
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RolloutError("rollout.weight_sync=distributed on GPUs needs an NCCL build of torch; "
                               "use rollout.weight_sync=disk")
        return "nccl"
    return "gloo"


class DistWeightSync:
    """Trainer rank 0's side of SGLang's distributed weight update (see the module docstring).

    world_size = 1 (trainer rank 0) + every server's TP ranks (GET /server_info `tp_size`); server k gets
    rank_offset 1 + the TP sizes of servers before it. Tensors are sent in buckets of about `bucket_bytes`;
    `flattened=True` sends a bucket as one uint8 tensor (SGLang's load_format "flattened_bucket").
    """

    def __init__(self, client: SGLangClient, *, backend: str, master_address: str, master_port: int,
                 group_name: str = "megaent_weight_sync", bucket_bytes: int = 512 * 2**20, flattened: bool = True,
                 timeout_s: float = 600.0) -> None:
        self.client = client
        self.backend = backend
        self.master_address, self.master_port = master_address, master_port
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.flattened = flattened
        self.timeout_s = timeout_s
        self.group: Optional[dist.ProcessGroup] = None
        self.sessions = True  # the servers have /begin_weight_update (SGLang >= 0.5.23, megaent serve)

    # ------------------------------------------------------------ HTTP to every server at once
    def _http(self) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.client.api_key}"} if self.client.api_key else None
        return httpx.AsyncClient(timeout=self.timeout_s, headers=headers)

    async def _post_each(self, http: Any, path: str, bodies: Sequence[Optional[dict]], *, missing_ok: bool = False
                         ) -> list[Any]:
        """POST bodies[k] to server k; RolloutError on any failure (None for a 404 when `missing_ok`)."""
        rs = await asyncio.gather(*(http.post(s.url + path, json=b) for s, b in zip(self.client.servers, bodies)))
        out = []
        for s, r in zip(self.client.servers, rs):
            if missing_ok and r.status_code == 404:
                out.append(None)
                continue
            if r.status_code != 200:
                raise RolloutError(f"{s.url}{path} failed (HTTP {r.status_code}): {r.text[:800]}")
            out.append(r.json() if r.content else {})
        return out

    async def _post_all(self, http: Any, path: str, body: Optional[dict] = None, **kw: Any) -> list[Any]:
        return await self._post_each(http, path, [body] * len(self.client.servers), **kw)

    # ------------------------------------------------------------ group
    def init_group(self) -> None:
        """Servers join the group (HTTP) while this process joins as rank 0 (one rendezvous)."""
        from megaent.rollout.dist_update import join_group

        async def run() -> dist.ProcessGroup:
            async with self._http() as http:
                infos = await asyncio.gather(*(http.get(s.url + "/server_info") for s in self.client.servers))
                tps = [int(r.json().get("tp_size", 1)) for r in infos]
                world = 1 + sum(tps)
                bodies = [{"master_address": self.master_address, "master_port": self.master_port,
                           "rank_offset": 1 + sum(tps[:k]), "world_size": world, "group_name": self.group_name,
                           "backend": self.backend} for k in range(len(tps))]

                def join() -> dist.ProcessGroup:
                    return join_group(master_address=self.master_address, master_port=self.master_port, rank=0,
                                      world_size=world, group_name=self.group_name, backend=self.backend,
                                      timeout_s=self.timeout_s)
                group = await _alongside(self._post_each(http, "/init_weights_update_group", bodies), join)
            log.info("weight-update group %s: trainer rank 0 + %d server ranks over %s", self.group_name, world - 1,
                     self.backend)
            return group
        self.group = asyncio.run(run())

    def close(self) -> None:
        """Servers leave the group (/destroy_weights_update_group), then this process does."""
        if self.group is None:
            return

        async def run() -> None:
            async with self._http() as http:
                await self._post_all(http, "/destroy_weights_update_group", {"group_name": self.group_name})
        try:
            asyncio.run(run())
        finally:
            dist.destroy_process_group(self.group)
            self.group = None

    # ------------------------------------------------------------ one sync
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, weight_version: Optional[str] = None
             ) -> int:
        """Send full HF-named tensors in buckets inside one session; returns the bytes sent.

        pause (retract) -> begin -> buckets -> end -> continue; a rejected bucket ends the session without
        loading anything and raises RolloutError with the server's message."""
        if self.group is None:
            self.init_group()
        return asyncio.run(self._push(named_tensors, weight_version))

    async def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: Optional[str]) -> int:
        sent = 0
        async with self._http() as http:
            await self._post_all(http, "/pause_generation", {"mode": "retract"})
            try:
                if self.sessions and None in await self._post_all(http, "/begin_weight_update", {},
                                                                  missing_ok=True):
                    self.sessions = False  # an older SGLang: each bucket loads on its own
                try:
                    bucket: list[tuple[str, torch.Tensor]] = []
                    size = 0
                    for name, t in named_tensors:
                        bucket.append((name, t))
                        size += t.numel() * t.element_size()
                        if size >= self.bucket_bytes:
                            sent += await self._send(http, bucket, last=False,
                                                     weight_version=None if self.sessions else weight_version)
                            bucket, size = [], 0
                    if bucket:
                        sent += await self._send(http, bucket, weight_version=weight_version, last=True)
                except BaseException:
                    if self.sessions:  # discards what was staged; the servers keep their weights
                        try:
                            await self._post_all(http, "/end_weight_update", {})
                        except RolloutError as e:  # expected: a failed session's end loads nothing, says so
                            log.info("weight-update session ended without loading: %s", e)
                    raise
                if self.sessions:
                    await self._post_all(http, "/end_weight_update", {})
            finally:
                await self._post_all(http, "/continue_generation", {})
        return sent

    async def _send(self, http: Any, bucket: list[tuple[str, torch.Tensor]], *, weight_version: Optional[str],
                    last: bool) -> int:
        body: dict[str, Any] = {
            "names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name, "flush_cache": last,
            "load_format": "flattened_bucket" if self.flattened else None}
        if weight_version is not None:
            body["weight_version"] = weight_version
        if self.flattened:  # SGLang's FlattenedTensorBucket layout: the tensors' bytes back to back
            payload = [torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])]
        else:
            payload = [t.contiguous() for _, t in bucket]

        def bcast() -> None:
            for t in payload:
                dist.broadcast(t, group_src=0, group=self.group)
        await _alongside(self._post_all(http, "/update_weights_from_distributed", body), bcast)
        return sum(t.numel() * t.element_size() for t in payload)
