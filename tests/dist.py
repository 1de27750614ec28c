"""Run a function on N gloo ranks (spawned processes on 127.0.0.1) and collect results.

`run_ranks(fn, world_size, *args)` sets the torchrun variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) in each child, one thread
each (the CI machine has 2 cores), calls `fn(rank, world_size, *args)` and
returns the list of per-rank return values (anything torch.save can write).
`fn` must be a module-level function. The child does not create a process
group: call `megaent.parallel.init_parallel(tp, pp)` (or `init_gloo()`) in it.
A failing rank re-raises in the parent with its traceback.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megaent.parallel.launch import free_port


def _child(rank: int, fn: Callable, world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            import sys

            if "megatron.core" in sys.modules:  # importing it just to tear down costs seconds per rank
                from megatron.core import parallel_state as mps

                if mps.model_parallel_is_initialized():
                    mps.destroy_model_parallel()
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_child, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def init_gloo() -> None:
    """A plain default process group from the variables `run_ranks` set (no megatron groups)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
