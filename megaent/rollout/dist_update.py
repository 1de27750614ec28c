"""Weights over a process group, SGLang's way: the server side of `megaent serve`, and the group both sides join.

SGLang's RL weight sync (entrypoints/http_server.py, model_runner's weight updater): the trainer asks each
server to join a second process group (`/init_weights_update_group`: master_address, master_port,
rank_offset, world_size, group_name, backend), joins it itself as rank 0, then per bucket posts the
tensors' names / dtypes / shapes (`/update_weights_from_distributed`) while it broadcasts them from group
rank 0. Server TP rank r is group rank rank_offset + r; every TP rank receives the full tensors and keeps
its own shard. `load_format="flattened_bucket"` sends a bucket as one uint8 tensor (the tensors' bytes
back to back, SGLang's `FlattenedTensorBucket`), one broadcast per bucket instead of one per tensor.

Where megaent departs from SGLang: nothing is ever half-loaded. A request's tensors are always received
(so the trainer's broadcast completes), then checked as a whole against the served model (every name
known, the served dtype, the full HF shape); a mismatch rejects the whole request and the served weights
stay as they were. Inside a session (`/begin_weight_update` ... `/end_weight_update`, SGLang 0.5.23's
routes) the checked shards are staged and copied into the model only at the end, so a failed bucket
discards the buckets before it too; without a session each request is applied on its own once checked.
Staging holds this rank's shard of every sent tensor (1 / TP of the model) until the end.

Everything here runs in the batcher's engine thread (`DynamicBatcher.run_exclusive`), so no decode sees
a model in the middle of a copy. `join_group` is also the trainer's side (megaent.rollout.weight_sync).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.model.hf_names import Part, tp_slice, unfuse_local

log = logging.getLogger(__name__)
GROUP_TIMEOUT_S = 600.0
"""Rendezvous and collective timeout of a weight-update group (a trainer that never joins frees the server
after this long)."""


def join_group(*, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
               backend: str, timeout_s: float = GROUP_TIMEOUT_S) -> dist.ProcessGroup:
    """Join a process group of its own over a TCP store at master_address:master_port (rank 0 hosts it).

    The sequence of SGLang's `init_custom_process_group` (adapted there from vLLM / OpenRLHF): c10d
    rendezvous on tcp://, a PrefixStore named after the group, `_new_process_group_helper` with no
    global ranks, so the group lives beside the default one (which it neither needs nor touches). Both
    sides must build it the same way, which is why the trainer calls this too. Blocks until all
    `world_size` ranks have joined.
    """
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # group rank = "global" rank inside it
    return pg


def parse_dtype(name: str) -> torch.dtype:
    """ "bfloat16" or "torch.bfloat16" -> torch.bfloat16 (SGLang sends the former)."""
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dt


def receive(group: dist.ProcessGroup, names: Sequence[str], dtypes: Sequence[torch.dtype],
            shapes: Sequence[Sequence[int]], *, flattened: bool, device: torch.device
            ) -> list[tuple[str, torch.Tensor]]:
    """The tensors group rank 0 broadcasts: one broadcast per tensor, or one uint8 buffer when `flattened`."""
    if not flattened:
        out = []
        for n, dt, s in zip(names, dtypes, shapes):
            t = torch.empty(tuple(s), dtype=dt, device=device)
            dist.broadcast(t, group_src=0, group=group)
            out.append((n, t))
        return out
    sizes = [torch.Size(s).numel() * dt.itemsize for dt, s in zip(dtypes, shapes)]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buf, group_src=0, group=group)
    return [(n, b.view(dt).reshape(tuple(s)))
            for n, dt, s, b in zip(names, dtypes, shapes, buf.split(sizes))]


def served_table(policy: Any) -> dict[str, tuple[Part, str]]:
    """HF name -> (Part, megaent parameter name) of every tensor the served policy is built from."""
    return {p.hf_name: (p, spec.name) for spec in policy.param_specs() for p in spec.parts}


def check_tensors(policy: Any, tensors: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """What does not fit the served model: unknown or repeated names, another dtype, another full shape."""
    table = served_table(policy)
    problems, seen = [], set()
    for name, t in tensors:
        if name in seen:
            problems.append(f"{name}: sent twice in one request")
        seen.add(name)
        if name not in table:
            problems.append(f"{name}: the served model has no such tensor")
            continue
        part = table[name][0]
        if tuple(t.shape) != part.shape:
            problems.append(f"{name}: shape {list(t.shape)} where the served model has {list(part.shape)}")
        if t.dtype != policy.dtype:
            problems.append(f"{name}: dtype {str(t.dtype).removeprefix('torch.')} where the served model has "
                            f"{str(policy.dtype).removeprefix('torch.')} (send that dtype, or serve with --dtype)")
    return problems


def local_shards(policy: Any, tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """This TP rank's shard of each (checked) full HF tensor."""
    table, st = served_table(policy), policy.state
    out = {}
    for n, t in tensors:
        shard = tp_slice(t, tuple(t.shape), table[n][0].kind, st.tp_rank, st.tp,
                         padded_rows=policy.padded_vocab_size, what=n)
        # At TP > 1 a shard is a view of the full tensor: copy it so the receive buffer can go. At TP = 1 the
        # shard is the whole (fresh) tensor, or a view of a bucket that is kept whole anyway.
        out[n] = shard.clone() if st.tp > 1 else shard
    return out


@torch.no_grad()
def apply_shards(policy: Any, shards: dict[str, torch.Tensor]) -> None:
    """Copy checked local shards into the policy's parameters (a fused parameter's other parts untouched).

    In-place copies bump each parameter's version, which is what the decode runner's packed-weight caches
    are stamped with, so they are rebuilt on the next decode."""
    params = dict(policy.named_parameters())
    for spec in policy.param_specs():
        if not any(p.hf_name in shards for p in spec.parts):
            continue
        param = params[spec.name]
        pieces = unfuse_local(spec, param, policy.state.tp, padded_rows=policy.padded_vocab_size)  # views
        for part, piece in zip(spec.parts, pieces):
            if part.hf_name in shards:
                piece.copy_(shards[part.hf_name])


def weights_by_name(policy: Any, name: str, truncate_size: int) -> list:
    """SGLang's /get_weights_by_name (a test route): this rank's shard of HF tensor `name` (the whole tensor at
    TP = 1, vocabulary padding dropped), fp32, its first `truncate_size` rows as nested lists."""
    table = served_table(policy)
    if name not in table:
        raise KeyError(f"name={name!r}: the served model has no such tensor")
    part, pname = table[name]
    spec = next(s for s in policy.param_specs() if s.name == pname)
    param = dict(policy.named_parameters())[pname].detach()
    shard = unfuse_local(spec, param, policy.state.tp, padded_rows=policy.padded_vocab_size)[spec.parts.index(part)]
    if part.kind == "vocab" and policy.state.tp == 1:
        shard = shard[:part.shape[0]]
    return shard.float().cpu()[:truncate_size].tolist()


@dataclass
class _Updater:
    """Per served engine: its weight-update groups and the open session's staged shards."""

    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    session: bool = False
    staged: dict[str, torch.Tensor] = field(default_factory=dict)
    failed: Optional[str] = None  # the session's first rejection; its end then commits nothing


_UPDATERS: "weakref.WeakKeyDictionary[Any, _Updater]" = weakref.WeakKeyDictionary()


def _updater(engine: Any) -> _Updater:
    if engine not in _UPDATERS:
        _UPDATERS[engine] = _Updater()
    return _UPDATERS[engine]


# ---------------------------------------------------------------- engine ops: (engine, *args) -> (ok, message)
def op_init_group(engine: Any, master_address: str, master_port: int, rank_offset: int, world_size: int,
                  group_name: str, backend: str) -> tuple[bool, str]:
    up, st = _updater(engine), engine.state
    if group_name in up.groups:
        return False, f"group_name={group_name!r} is already initialized; destroy it first or pick another name"
    if backend == "nccl" and st.device.type != "cuda":
        return False, ("backend='nccl' needs GPUs and this megaent serve runs on CPU; ask for backend='gloo' "
                       "(megaent's trainer does on CPU)")
    rank = rank_offset + st.tp_rank
    try:
        up.groups[group_name] = join_group(master_address=master_address, master_port=master_port, rank=rank,
                                           world_size=world_size, group_name=group_name, backend=backend)
    except Exception as e:  # rendezvous timeout, a taken group name, an unknown backend
        log.error("joining weight-update group %s failed: %s", group_name, e)
        return False, f"Failed to initialize custom process group: {e}."
    log.info("joined weight-update group %s as rank %d of %d (%s)", group_name, rank, world_size, backend)
    return True, "Succeeded to initialize custom process group."


def op_destroy_group(engine: Any, group_name: str) -> tuple[bool, str]:
    pg = _updater(engine).groups.pop(group_name, None)
    if pg is None:
        return False, "The group to be destroyed does not exist."
    dist.destroy_process_group(pg)
    return True, "Succeeded to destroy custom process group."


def op_begin(engine: Any) -> tuple[bool, str]:
    up = _updater(engine)
    if up.session:
        return False, "a weight-update session is already open; call end_weight_update() first"
    up.session, up.staged, up.failed = True, {}, None
    return True, "Success"


def op_end(engine: Any) -> tuple[bool, str]:
    up = _updater(engine)
    if not up.session:
        return False, "no weight-update session is open; call begin_weight_update() first"
    staged, failed = up.staged, up.failed
    up.session, up.staged, up.failed = False, {}, None
    if failed is not None:
        return False, f"Nothing was loaded: {failed}. The served weights are unchanged."
    apply_shards(engine.policy, staged)
    return True, "Success"


def op_receive(engine: Any, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]],
               flattened: bool) -> tuple[bool, str, bool]:
    """Receive one request's tensors, check them, then stage (session) or apply them; all or nothing.
    Returns (ok, message, staged)."""
    up = _updater(engine)
    group = up.groups.get(group_name)
    if group is None:
        return False, (f"group_name={group_name!r} is not initialized; POST /init_weights_update_group first "
                       f"(initialized: {sorted(up.groups)})"), False
    tensors = receive(group, names, [parse_dtype(d) for d in dtypes], shapes, flattened=flattened,
                      device=engine.state.device)
    if up.session and up.failed is not None:
        return False, f"this weight-update session already failed ({up.failed}); end it and start again", False
    problems = check_tensors(engine.policy, tensors)
    if problems:
        msg = "the tensors do not fit the served model: " + "; ".join(problems[:8])
        if up.session:
            up.failed, up.staged = msg, {}
        return False, f"Failed to update parameter online: {msg}. The served weights are unchanged.", False
    shards = local_shards(engine.policy, tensors)
    del tensors  # the full receive buffer
    if up.session:
        up.staged.update(shards)
        return True, f"Staged {len(shards)} tensors; they load at end_weight_update.", True
    apply_shards(engine.policy, shards)
    return True, "Succeeded to update parameter online.", False


DIST_OPS = {"dist_init_group": op_init_group, "dist_destroy_group": op_destroy_group, "dist_begin": op_begin,
            "dist_end": op_end, "dist_receive": op_receive}
"""Engine ops of the distributed update, by name (the TP command bus of megaent.rollout.server runs them)."""
