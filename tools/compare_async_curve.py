"""The demo's learning curve with asynchronous rollouts vs the synchronous seed band, servers in other processes.

    python tools/compare_async_curve.py [--seeds 0 1 2 --steps 60 --last 10]

Runs configs/demo.yaml (the demo's warmed policy, as tools/demo.sh runs every seed from it) through one
`megaent serve` subprocess, once per seed with rollout.async_steps=0 and once with async_steps=1, the server
put back on the initial weights before each run. Prints, per seed and mode, the mean reward and entropy over
the last `--last` steps, the band of the synchronous seeds (min-max), whether each async run lies inside it,
then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--last", type=int, default=10, help="steps averaged at the end of each run")
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    p.add_argument("--async-old-logprobs", default="behaviour", choices=["behaviour", "recompute"])
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from megaent.config import Config, load_config
    from megaent.data.warmup import warmup_policy
    from megaent.parallel.launch import free_port
    from megaent.rollout.client import SGLangClient
    from megaent.rollout.launcher import launch_megaent
    from megaent.trainer.components import demo_policy_dir
    from megaent.trainer.run import train

    c = Config()
    policy = str(warmup_policy(demo_policy_dir("arith", 0, digits=c.data.task_max_digits,
                                               steps=c.model.demo_warmup_steps),
                               seed=0, steps=c.model.demo_warmup_steps, max_digits=c.data.task_max_digits))
    out: dict[str, dict[int, dict[str, float]]] = {"sync": {}, "async": {}}
    with tempfile.TemporaryDirectory() as tmp:
        servers = launch_megaent(policy, ports=[free_port()], log_dir=Path(tmp), env={"OMP_NUM_THREADS": "1"})
        try:
            client = SGLangClient(servers.urls)
            for seed in a.seeds:
                for mode, steps_ahead in (m for m in (("sync", 0), ("async", 1)) if m[0] in a.modes):
                    client.update_weights_from_disk(policy)
                    run = Path(tmp) / f"{mode}_{seed}"
                    cfg = load_config(ROOT / "configs" / "demo.yaml", [
                        f"model.path={policy}", f"trainer.seed={seed}", f"trainer.steps={a.steps}",
                        "trainer.checkpoint_every=0", "trainer.quiet=true", "rollout.engine=http",
                        f"rollout.urls=[{servers.urls[0]}]", f"rollout.async_steps={steps_ahead}",
                        f"rollout.async_old_logprobs={a.async_old_logprobs}",
                        f"trainer.run_dir={run}"])
                    assert train(cfg) == 0, f"{mode} seed {seed} failed"
                    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x][-a.last:]
                    out[mode][seed] = {k: statistics.mean(r[k] for r in rows) for k in ("reward/mean", "entropy/mean")}
        finally:
            servers.stop()
    print(f"{'seed':>4s} {'mode':>6s} {'reward':>8s} {'entropy':>8s}")
    for seed in a.seeds:
        for mode in a.modes:
            m = out[mode][seed]
            print(f"{seed:4d} {mode:>6s} {m['reward/mean']:8.3f} {m['entropy/mean']:8.3f}")
    if a.modes != ["sync", "async"]:
        print(json.dumps({"bench": "async_curve", "async_old_logprobs": a.async_old_logprobs, **out}))
        return
    band = {k: (min(v[k] for v in out["sync"].values()), max(v[k] for v in out["sync"].values()))
            for k in ("reward/mean", "entropy/mean")}
    inside = {k: [band[k][0] <= out["async"][s][k] <= band[k][1] for s in a.seeds] for k in band}
    for k, (lo, hi) in band.items():
        print(f"sync band of {k} over the last {a.last} steps: [{lo:.3f}, {hi:.3f}]; async inside: {inside[k]}")
    print(json.dumps({"bench": "async_curve", "async_old_logprobs": a.async_old_logprobs, "seeds": a.seeds, "steps": a.steps, "last": a.last,
                      "sync": out["sync"], "async": out["async"], "band": band, "inside": inside}))


if __name__ == "__main__":
    main()
