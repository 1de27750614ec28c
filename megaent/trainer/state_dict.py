"""Model + optimizer state in canonical, layout-independent form for torch.distributed.checkpoint.

Every local parameter shard is unfused into its HF parts (q/k/v, gate/up) and wrapped as a DTensor over this
pipeline stage's (dp, tp) device mesh with the part's global HF shape: column parts `Shard(0)`, row parts
`Shard(1)`, vocabulary parts `Shard(0)` with the padding rows cut off (megaent pads the vocabulary to
ceil(V / tp) * tp, so the real rows of rank r are exactly `torch.chunk(full, tp)[r]`, DTensor's uneven-shard
rule), replicated parts `Replicate()`; every part is replicated over dp. DCP then reshards to any TP x PP
layout on load. The local DTensor tensors are views of the live parameters and Adam moments, so `dcp.load`
fills them in place.

Keys: `model.<hf name>`, `optim.exp_avg.<hf name>`, `optim.exp_avg_sq.<hf name>`. A tied head on the last stage
(PP > 1) is not written (it equals the embedding) but is read back from `model.model.embed_tokens.weight`.
Parameters with fp32 masters (bf16 training) checkpoint the masters, not the rounded bf16 copies.

ZeRO-1 (`optimizer.zero1`): a parameter's master and Adam moments live only on its owner DP rank, so the
owner's TP group alone writes that parameter's `model.*` and `optim.*` keys, as DTensors on its TP sub-mesh
(the other DP replicas hold no moments and, with bf16 params, only the rounded copy). Keys and global shapes
are the same as without ZeRO-1, so a checkpoint loads into any layout, ZeRO-1 or not: on load every rank
reads the `model.*` keys (into its master when it owns the parameter, else into the live parameter) and the
moments of the parameters it owns.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megaent.model.hf_names import unfuse_local
from megaent.parallel import ParallelState

_PLACEMENT = {"column": Shard(0), "vocab": Shard(0), "row": Shard(1), "replicated": Replicate()}


def stage_mesh(state: ParallelState) -> DeviceMesh:
    """(dp, tp) mesh of this rank's pipeline stage, cut from the world's (pp, dp, tp) grid (megatron order)."""
    grid = torch.arange(state.world_size).reshape(state.pp, state.dp, state.tp)
    mesh = DeviceMesh(state.device.type, grid, mesh_dim_names=("pp", "dp", "tp"))
    return mesh["dp", "tp"]


def _parts(policy: Any, local: torch.Tensor, spec: Any, *, loading: bool) -> Iterator[tuple[Any, torch.Tensor]]:
    tp = policy.state.tp
    tied_copy = spec.name == "head.weight" and policy.arch.tie_word_embeddings
    if tied_copy and not loading:
        return
    pieces = unfuse_local(spec, local, tp, padded_rows=policy.padded_vocab_size)
    for part, piece in zip(spec.parts, pieces):
        if part.kind == "vocab":
            chunk = -(-part.shape[0] // tp)
            if piece.shape[0] != chunk:
                raise NotImplementedError(f"checkpointing needs the vocabulary padded to ceil(V/tp)*tp; "
                                          f"{spec.name} has {piece.shape[0]} rows per rank, expected {chunk}")
            piece = piece[: policy.local_vocab_valid]
        yield part, piece


def _dtensor(piece: torch.Tensor, part: Any, mesh: DeviceMesh) -> DTensor:
    """Local piece -> DTensor of the part's global shape on `mesh` ((dp, tp) or tp): replicated over dp."""
    full = torch.empty(part.shape, device="meta")
    placements = [Replicate()] * (mesh.ndim - 1) + [_PLACEMENT[part.kind]]
    return DTensor.from_local(piece, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def _adam_moments(optimizer: Any, index: int) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq of parameter `index`, created as zeros when AdamW has not stepped yet."""
    master = optimizer.masters[index]
    st = optimizer.inner.state[master]
    if "exp_avg" not in st:
        st["step"] = torch.tensor(float(optimizer.step_count))
        st["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}


def canonical_state(policy: Any, optimizer: Any, state: ParallelState, *, loading: bool) -> dict[str, Any]:
    """DCP state dict of this rank: DTensor views of the model (and Adam moments when `optimizer` is given)."""
    mesh = stage_mesh(state)
    zero1 = optimizer is not None and optimizer.zero1
    owner_mesh = mesh["tp"] if zero1 else mesh  # ZeRO-1: the owner's TP group writes (see module docstring)
    params = dict(policy.named_parameters())
    index = {id(p): i for i, p in enumerate(optimizer.params)} if optimizer is not None else {}
    out: dict[str, Any] = {}
    for spec in policy.param_specs():
        param = params[spec.name]
        i = index.get(id(param))
        owned = i is not None and i in optimizer.masters
        if zero1 and not owned:
            if loading:  # read the parameter straight into the live tensor; its owner restores the moments
                for part, piece in _parts(policy, param.data, spec, loading=True):
                    out[f"model.{part.hf_name}"] = _dtensor(piece, part, mesh)
            continue
        value = optimizer.masters[i] if owned else param.data
        for part, piece in _parts(policy, value.data, spec, loading=loading):
            out[f"model.{part.hf_name}"] = _dtensor(piece, part, owner_mesh)
        if not owned:
            continue
        for key, moment in _adam_moments(optimizer, i).items():
            for part, piece in _parts(policy, moment, spec, loading=loading):
                out[f"optim.{key}.{part.hf_name}"] = _dtensor(piece, part, owner_mesh)
    return out


def finish_load(policy: Any, optimizer: Any, *, step: int) -> None:
    """After `dcp.load` into masters: copy fp32 masters into bf16 params and set Adam's step counters.

    DCP writes into the parameters' storage behind autograd's back, which leaves their version counters
    where they were; they are bumped here, so caches stamped with (data_ptr, version) (the decode runner's and
    megaent.ops.gemm's packed weights, rollout activation tapes) cannot survive a load."""
    from torch.autograd.graph import increment_version

    for p in policy.parameters():
        increment_version(p)
    if optimizer is None:
        return
    optimizer.step_count = step
    with torch.no_grad():
        for i, p in enumerate(optimizer.params):
            m = optimizer.masters.get(i)
            if m is not None and m is not p:
                p.copy_(m)
            if m is not None and optimizer.inner is not None and m in optimizer.inner.state:
                optimizer.inner.state[m]["step"] = torch.tensor(float(step))
