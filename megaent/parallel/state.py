"""The one object that owns the process groups: `ParallelState`.

`init_parallel(tp, pp)` starts torch.distributed (gloo on CPU; on GPUs
`cpu:gloo,cuda:nccl`: NCCL for device tensors, gloo for host objects) from
the launch environment and builds megatron-core's tensor/pipeline/data groups.
Only this package touches megatron-core's global `parallel_state`; everything
else receives groups explicitly from the `ParallelState`.

Rank layout (megatron-core's default order tp-dp-pp): TP is the fastest axis,
then DP, then PP, so a TP group is contiguous ranks and PP stages are far apart.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megaent.parallel.launch import LaunchEnv, read_launch_env

log = logging.getLogger(__name__)


class ParallelError(RuntimeError):
    """A launch or layout problem the user must fix (message says how)."""


@dataclass
class ParallelState:
    """Process groups and coordinates of this rank in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    mp_group: Optional[dist.ProcessGroup]  # TP x PP: one model replica
    embedding_group: Optional[dist.ProcessGroup]  # first + last stage (tied embeddings)
    pp_ranks: list[int] = field(default_factory=list)  # global ranks of my pipeline, by stage
    dp_ranks: list[int] = field(default_factory=list)  # global ranks of my DP group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    launch: Optional[LaunchEnv] = None
    ep: int = 1  # expert parallelism: MoE experts split over ep ranks carved out of DP (megatron-core's layout)
    ep_rank: int = 0
    ep_group: Optional[dist.ProcessGroup] = None
    edp_rank: int = 0  # rank among the replicas of this rank's experts (expert-data-parallel)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def prev_stage_rank(self) -> int:
        return self.pp_ranks[self.pp_rank - 1]

    def next_stage_rank(self) -> int:
        return self.pp_ranks[self.pp_rank + 1]


def _pick_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ParallelError("parallel.backend=nccl needs CUDA GPUs and an NCCL build of torch; "
                            "use parallel.backend=gloo (or auto) on CPU")
    return backend


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, *, backend: str = "auto", timeout_s: int = 1800,
                  seed: int = 0) -> ParallelState:
    """Initialise torch.distributed and the TP/PP/DP groups; DP = world / (TP * PP). `ep` splits MoE experts over
    ep ranks of each DP group (megatron-core's expert_model_parallel_size; ep must divide DP).

    Reads torchrun or Slurm variables (see `megaent.parallel.launch`); a bare
    process becomes a world of one. Safe to call when the default group exists.
    On CPU it turns on megaent's CPU backend for megatron-core (`megaent.parallel.cpu_backend`).
    Seeds megatron-core's RNG tracker from `seed` (per TP rank, as Megatron does) without moving
    the caller's CPU RNG stream.
    """
    from megatron.core import parallel_state as mps

    env = read_launch_env()
    if env.world_size % (tp * pp) != 0:
        raise ParallelError(f"world size {env.world_size} is not divisible by parallel.tp * parallel.pp = "
                            f"{tp} * {pp}; launch a multiple of {tp * pp} processes or change parallel.tp/pp")
    dp = env.world_size // (tp * pp)
    if ep < 1 or dp % ep != 0:
        raise ParallelError(f"parallel.ep={ep} must divide the data-parallel size {dp} (world {env.world_size} / "
                            f"(tp {tp} * pp {pp})); launch more processes or lower parallel.ep")
    backend = _pick_backend(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # On GPUs every group is NCCL for device tensors and gloo for host ones: object collectives
        # (broadcast_object_list, all_gather_object) pickle on the host and go over gloo, never through GPU memory.
        dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
        _destroy_subgroups()
    mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  expert_model_parallel_size=ep, distributed_timeout_minutes=max(1, timeout_s // 60))
    if device.type == "cpu":
        from megaent.parallel import cpu_backend

        cpu_backend.enable()
    _seed_rng_tracker(seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    state = ParallelState(
        rank=rank, world_size=world, tp=tp, pp=pp, dp=world // (tp * pp),
        tp_rank=mps.get_tensor_model_parallel_rank(), pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(),
        tp_group=mps.get_tensor_model_parallel_group(), pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(), mp_group=mps.get_model_parallel_group(),
        embedding_group=mps.get_embedding_group(check_initialized=False),
        pp_ranks=list(dist.get_process_group_ranks(mps.get_pipeline_model_parallel_group())),
        dp_ranks=list(dist.get_process_group_ranks(mps.get_data_parallel_group())),
        device=device, backend=backend, launch=env, ep=ep, ep_rank=mps.get_expert_model_parallel_rank(),
        ep_group=mps.get_expert_model_parallel_group(), edp_rank=mps.get_expert_data_parallel_rank(),
    )
    log.debug("rank %d: tp %d/%d pp %d/%d dp %d/%d", rank, state.tp_rank, tp, state.pp_rank, pp, state.dp_rank,
              state.dp)
    return state


def _destroy_subgroups() -> None:
    """Shut down every process group but the default one: a re-initialisation's old megatron-core groups (its
    destroy_model_parallel shuts only the *_GLOO ones) and megaent's. Each gloo group keeps polling threads; a
    process re-initialised per layout (the layout tests) piled up ~550 groups, 1646 threads, 158 runnable."""
    from torch.distributed import distributed_c10d as c10d

    for pg in list(c10d._world.pg_map):
        if pg is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(pg)


def _seed_rng_tracker(seed: int) -> None:
    """megatron-core's RNG tracker (dropout, init, sequence-parallel regions), seeded per TP rank. On CPU the
    tracker's "CUDA" generator is the CPU one, so its seeding would move the CPU stream: restore it."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu = torch.get_rng_state()
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.set_rng_state(cpu)


def destroy_parallel() -> None:
    """Tear down megatron-core groups and the default process group."""
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def singleton_state(state: ParallelState) -> ParallelState:
    """A world-of-one view of this rank (TP = PP = DP = 1 over a group holding only itself).

    For work every rank does alone, e.g. a full inference copy of the policy for rollouts when the trainer is
    pipeline-parallel. Collective: every rank creates every singleton group (torch requires all ranks to take
    part in each `new_group`).
    """
    mine = None
    for r in range(state.world_size):
        g = dist.new_group([r])
        if r == state.rank:
            mine = g
    return ParallelState(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                         tp_group=mine, pp_group=mine, dp_group=mine, mp_group=mine, embedding_group=None,
                         pp_ranks=[state.rank], dp_ranks=[state.rank], device=state.device, backend=state.backend,
                         launch=state.launch)
