"""Model + optimizer state in canonical, layout-independent form for torch.distributed.checkpoint.

Every local parameter shard is unfused into its HF parts (q/k/v, gate/up) and wrapped as a DTensor over this
pipeline stage's (dp, tp) device mesh with the part's global HF shape: column parts `Shard(0)`, row parts
`Shard(1)`, vocabulary parts `Shard(0)` with the padding rows cut off (megaent pads the vocabulary to
ceil(V / tp) * tp, so the real rows of rank r are exactly `torch.chunk(full, tp)[r]`, DTensor's uneven-shard
rule), replicated parts `Replicate()`; every part is replicated over dp. DCP then reshards to any TP x PP x DP
layout on load.

Keys: `model.<hf name>`, `optim.exp_avg.<hf name>`, `optim.exp_avg_sq.<hf name>`. A tied head on the last stage
(PP > 1) is not written (it equals the embedding) but is read back from `model.model.embed_tokens.weight`.
With bf16 parameters the fp32 main parameters are checkpointed, not the rounded bf16 copies.

The optimizer is megatron-core's (`megaent.trainer.mcore_engine.Engine`). Its state per model parameter (fp32
main parameter, Adam's exp_avg / exp_avg_sq) is read through the optimizer's own maps: the float16 optimizer's
(model, main) groups, or, with the distributed optimizer, each DP rank's flat range of the parameter
(`_get_model_param_range_map`, `_get_main_param_and_optimizer_states`, megatron-core 0.16.1, which megaent pins).
Distributed-optimizer shards are assembled into the parameter's TP-local shape by one all-reduce over dp_group
per tensor (each rank fills its range, zeros elsewhere), so the checkpoint has the same keys and shapes with or
without it and loads into either; the cost is that a save holds the TP-local optimizer state unsharded for a
moment (12 bytes per local parameter). megatron-core's `dist_checkpointing` with fully sharded model-space
optimizer state avoids that transient and is the road for 32B-class runs.

GPTModel's fused QKV is laid out per query group; its HF view (`GPTPolicy.megaent_params`) is a copy for that
one parameter, so on load DCP fills a buffer that `finish_load` writes back in megatron-core's layout.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megaent.model.hf_names import unfuse_local
from megaent.parallel import ParallelState

_PLACEMENT = {"column": Shard(0), "vocab": Shard(0), "row": Shard(1), "replicated": Replicate()}


def stage_mesh(state: ParallelState) -> DeviceMesh:
    """(dp, tp) mesh of this rank's pipeline stage, cut from the world's (pp, dp, tp) grid (megatron order)."""
    grid = torch.arange(state.world_size, device="cpu").reshape(state.pp, state.dp, state.tp)
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


def _sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_of(optimizer: Any, param: torch.nn.Parameter) -> tuple[Any, Optional[torch.Tensor], Any]:
    """(sub-optimizer, main parameter (flat shard with the distributed optimizer), flat range or None)."""
    for sub in _sub_optimizers(optimizer):
        index = getattr(sub, "model_param_group_index_map", None)
        if index is not None:  # distributed optimizer: this rank may own a flat range of the parameter, or none
            if param in sub.model_param_gbuf_map:  # only parameters with a non-empty range on this rank
                if param not in index:
                    return sub, None, None
                rng = sub._get_model_param_range_map(param)["param"]
                return sub, sub._get_main_param_and_optimizer_states(param)["param"], rng
            if any(param in buffer.param_index_map for buffer in sub.buffers):
                return sub, None, None  # this sub-optimizer's parameter, sharded wholly onto other DP ranks
            continue
        for model_group, main_group in zip(getattr(sub, "float16_groups", []),
                                           getattr(sub, "fp32_from_float16_groups", [])):
            for mp, main in zip(model_group, main_group):
                if mp is param:
                    return sub, main, None
        for group in sub.optimizer.param_groups if getattr(sub, "optimizer", None) is not None else []:
            for q in group["params"]:
                if q is param:  # FP32Optimizer: the parameter is its own main parameter
                    return sub, q, None
    raise KeyError("parameter not found in the megatron-core optimizer")


def _step_tensor(sub: Any, main: torch.Tensor, step: int) -> torch.Tensor:
    """Adam's step count where torch.optim keeps it: on the parameter's device when fused or capturable, else
    a host scalar."""
    defaults = getattr(sub.optimizer, "defaults", {})
    on_device = defaults.get("fused") or defaults.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=main.device if on_device else "cpu")


def _adam_state(sub: Any, main: torch.Tensor, *, step: int) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq of a main parameter, created as zeros when Adam has not stepped yet."""
    st = sub.optimizer.state[main]
    if "exp_avg" not in st:
        st["step"] = _step_tensor(sub, main, step)
        st["exp_avg"] = torch.zeros_like(main, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(main, memory_format=torch.preserve_format)
    return {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}


class CanonicalState(dict):
    """A DCP state dict; `writeback` holds what `finish_load` does once DCP has filled the tensors."""

    writeback: list[Callable[[], None]]


def canonical_state(policy: Any, engine: Any, state: ParallelState, *, loading: bool) -> CanonicalState:
    """DCP state dict of this rank: the model's parameters (and with `engine`, megatron-core's fp32 main
    parameters and Adam moments) as DTensors of the HF parts. With `loading`, call `finish_load` after
    `dcp.load`. Collectives with the distributed optimizer: 3 all-reduces per parameter on dp_group."""
    mesh = stage_mesh(state)
    view = policy.megaent_params() if hasattr(policy, "megaent_params") else dict(policy.named_parameters())
    named = dict(policy.named_parameters())
    to_model = getattr(policy, "_to_mcore", lambda name, t: t)
    mcore_name = getattr(policy, "mcore_name", lambda name: name)
    out = CanonicalState()
    out.writeback = []
    dp = state.dp_group if state.dp > 1 else None
    step = engine.step_count if engine is not None else 0
    for spec in policy.param_specs():
        param = named[mcore_name(spec.name)]
        tensors: dict[str, torch.Tensor] = {}
        if engine is None:
            tensors["model"] = view[spec.name].data
        else:
            sub, main, rng = _main_of(engine.optimizer, param)
            moments = _adam_state(sub, main, step=step) if main is not None else {}
            flat = {"model": main, **moments}
            for key in ("model", "exp_avg", "exp_avg_sq"):
                local = flat.get(key)
                if rng is not None or hasattr(sub, "model_param_group_index_map"):  # distributed: assemble
                    full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
                    if local is not None:
                        full[rng.start:rng.end] = local.detach().float()
                    if dp is not None:
                        dist.all_reduce(full, group=dp)
                    tensors[key] = full.view(param.shape)
                else:
                    tensors[key] = local.detach().view(param.shape)
        for key, t in tensors.items():
            src = policy._from_mcore(spec.name, t) if hasattr(policy, "_from_mcore") else t
            prefix = "model" if key == "model" else f"optim.{key}"
            for part, piece in _parts(policy, src, spec, loading=loading):
                out[f"{prefix}.{part.hf_name}"] = _dtensor(piece, part, mesh)
            if loading:
                out.writeback.append(_restore(policy, engine, param, spec.name, key, src, to_model, step=step))
    return out


def _restore(policy: Any, engine: Any, param: torch.nn.Parameter, name: str, key: str, src: torch.Tensor,
             to_model: Callable, *, step: int) -> Callable[[], None]:
    def run() -> None:
        value = to_model(name, src)  # megatron-core layout, the parameter's shape
        if engine is None:
            if value.data_ptr() != param.data_ptr():
                param.data.copy_(value)
            return
        sub, main, rng = _main_of(engine.optimizer, param)
        if key == "model":
            param.data.copy_(value.to(param.dtype))
        if main is None:
            return
        dst = main if key == "model" else _adam_state(sub, main, step=step)[key]
        flat = value.reshape(-1)
        dst.data.copy_(flat[rng.start:rng.end] if rng is not None else value.view_as(dst))
    return run


def finish_load(policy: Any, engine: Any, state_dict: CanonicalState, *, step: int) -> None:
    """After `dcp.load`: write the loaded tensors into the model (megatron-core layout) and the optimizer (main
    parameters, Adam moments, Adam's step = `step`), and bump the parameters' version counters.

    DCP writes behind autograd's back, which leaves version counters where they were; they are bumped here, so
    caches stamped with (data_ptr, version) (the decode runner's packed weights) cannot survive a load."""
    from torch.autograd.graph import increment_version

    with torch.no_grad():
        for fn in state_dict.writeback:
            fn()
    if engine is not None:
        engine.step_count = step
        for sub in _sub_optimizers(engine.optimizer):
            for main, st in sub.optimizer.state.items():
                if "step" in st:
                    st["step"] = _step_tensor(sub, main, step)
    for p in policy.parameters():
        increment_version(p)
