"""Stand-in for `megaent train` in Slurm tests: the trainer's job contract without a model.

    MEGAENT_STANDIN_STEP_S=0.3 python tests/slurm_standin.py CONFIG trainer.run_dir=DIR trainer.steps=N [k=v ...]

(the step time comes from the environment, which sbatch passes on, because `megaent submit` validates every
key=value against the config schema.)

Contract it mimics (what megaent/slurm/template.py relies on):
- ranks come from the Slurm environment through `megaent.parallel.init_parallel` (SLURM_PROCID, SLURM_NTASKS,
  MASTER_ADDR/MASTER_PORT), gloo;
- each step does one all-reduce whose result every rank checks, and rank 0 appends
  `step=<i> restart=<SLURM_RESTART_COUNT> world=<W> sum=<all-reduce result>` to DIR/steps.log;
- SIGUSR1 / SIGTERM set a flag; at the next step boundary the ranks agree (all-reduce MAX), rank 0 writes
  DIR/standin_ckpt.json {"next_step": i} atomically, all ranks pass a barrier and exit 3 ("requeue me");
- a start with DIR/standin_ckpt.json present resumes from its step; completion exits 0.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: the job runs `python tests/...`

EXIT_REQUEUE = 3


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    run_dir = Path(opts["trainer.run_dir"])
    steps = int(opts.get("trainer.steps", "5"))
    step_s = float(os.environ.get("MEGAENT_STANDIN_STEP_S", "0.3"))
    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    import torch
    import torch.distributed as dist

    from megaent.parallel import init_parallel

    state = init_parallel(1, 1, backend="gloo", timeout_s=120)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    ckpt = run_dir / "standin_ckpt.json"
    start = json.loads(ckpt.read_text())["next_step"] if ckpt.exists() else 0
    print(f"rank {state.rank}/{state.world_size} via {state.launch.source} "
          f"master {state.launch.master_addr}:{state.launch.master_port} start {start} restart {restart}", flush=True)
    for step in range(start, steps):
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            if state.rank == 0:
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"next_step": step}))
                tmp.replace(ckpt)
            dist.barrier()
            print(f"rank {state.rank}: stop signal {stop}, checkpointed next_step={step}, exit 3", flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
        x = torch.tensor([float((state.rank + 1) * (step + 1))])
        dist.all_reduce(x)
        expected = (step + 1) * state.world_size * (state.world_size + 1) / 2
        if x.item() != expected:
            print(f"rank {state.rank}: all-reduce gave {x.item()}, expected {expected}", flush=True)
            return 1
        if state.rank == 0:
            with open(run_dir / "steps.log", "a") as f:
                f.write(f"step={step} restart={restart} world={state.world_size} sum={x.item():g} "
                        f"t={time.time():.3f}\n")
        time.sleep(step_s)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
