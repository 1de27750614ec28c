"""Asynchronous vs synchronous RL steps on CPU, rollouts from `megaent serve` processes.

    python tools/bench_async.py [--steps 6 --prompts 16 --samples 16 --new-tokens 16 --servers 1 --rounds 2
                                 --weight-sync disk|distributed]

Starts `--servers` `megaent serve` subprocesses (one intra-op thread each) on the demo's warmed tiny policy
and runs `megaent train` in this process (one thread) against them, alternating `--rounds` times a synchronous
run (rollout.async_steps=0) and an asynchronous one (async_steps=1), the same config otherwise, the servers
put back on the initial weights before each run. From each run's metrics.jsonl, medians over the steps after
the first (step 1 of an async run has nothing to overlap with):

- gen: the rollout phase's own time (generation, rewards, group filter; `time/rollout_gen_s`);
- update: what the learner does besides (`time/step_s` of a sync run minus its rollout), the weight sync
  included: the async step cannot be shorter than max(gen, update) with both measured without overlap;
- step: `time/step_s`.

Prints `name ours ref ratio` rows: the async step against max(gen, update) of the sync runs (target <= 1.15)
and against the sync step (gen + update), then one JSON line. With two cores the server and the trainer each
get one; on a busier host both sides slow down and the overlap shrinks.
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


def run_once(policy: str, urls: list[str], run_dir: Path, a: argparse.Namespace, *, async_steps: int) -> list[dict]:
    from megaent.config import load_config
    from megaent.trainer.run import train

    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.path={policy}", f"trainer.steps={a.steps}", f"trainer.prompts_per_step={a.prompts}",
        f"trainer.mini_batch_size={a.prompts // 2}", "trainer.ppo_epochs=1", f"rollout.n_samples={a.samples}",
        f"rollout.max_new_tokens={a.new_tokens}", "rollout.ignore_eos=true", "trainer.checkpoint_every=0",
        "trainer.quiet=true", "trainer.dynamics_every=0", "rollout.engine=http",
        f"rollout.urls=[{','.join(urls)}]", f"rollout.async_steps={async_steps}", f"trainer.run_dir={run_dir}",
        "trainer.threads=1", f"rollout.weight_sync={a.weight_sync}"])
    assert train(cfg) == 0, f"training run {run_dir} failed"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per sample (EOS ignored)")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="sync/async run pairs, alternated")
    p.add_argument("--weight-sync", default="disk", choices=["disk", "distributed"], help="rollout.weight_sync")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from megaent.config import Config
    from megaent.data.warmup import warmup_policy
    from megaent.parallel.launch import free_port
    from megaent.rollout.client import SGLangClient
    from megaent.rollout.launcher import launch_megaent
    from megaent.trainer.components import demo_policy_dir

    load_start = os.getloadavg()[0]
    c = Config()
    policy = str(warmup_policy(demo_policy_dir("arith", 0, digits=c.data.task_max_digits,
                                               steps=c.model.demo_warmup_steps),
                               seed=0, steps=c.model.demo_warmup_steps, max_digits=c.data.task_max_digits))
    with tempfile.TemporaryDirectory() as tmp:
        servers = launch_megaent(policy, ports=[free_port() for _ in range(a.servers)], log_dir=Path(tmp),
                                 env={"OMP_NUM_THREADS": "1"})
        try:
            client = SGLangClient(servers.urls)
            runs: dict[int, list[list[dict]]] = {0: [], 1: []}
            for r in range(a.rounds):
                for mode in (0, 1):
                    client.update_weights_from_disk(policy)  # every run starts from the same served weights
                    runs[mode].append(run_once(policy, servers.urls, Path(tmp) / f"run{r}_{mode}", a,
                                               async_steps=mode))
        finally:
            servers.stop()

    def med(mode: int, key) -> float:
        return statistics.median(key(row) for run in runs[mode] for row in run[1:])

    gen = med(0, lambda m: m["time/rollout_gen_s"])
    update = med(0, lambda m: m["time/step_s"] - m["time/rollout_s"])
    sync_step = med(0, lambda m: m["time/step_s"])
    async_step = med(1, lambda m: m["time/step_s"])
    async_gen = med(1, lambda m: m["time/rollout_gen_s"])
    async_update = med(1, lambda m: m["time/step_s"] - m["time/rollout_s"] - m["time/prefetch_wait_s"])
    sync_train = med(0, lambda m: m["time/train_s"])
    async_train = med(1, lambda m: m["time/train_s"])
    async_wait = med(1, lambda m: m["time/prefetch_wait_s"] + m["time/rollout_s"])  # the rollout not hidden
    weight_sync = med(0, lambda m: m["time/step_s"] - m["time/rollout_s"] - m["time/train_s"])
    staleness = sorted({row["rollout/staleness"] for run in runs[1] for row in run[1:]})
    rows = [("async step / max(gen, update)", async_step, max(gen, update)),
            ("async step / sync step", async_step, sync_step),
            ("sync step / (gen + update)", sync_step, gen + update),
            ("async gen / sync gen (overlap cost)", async_gen, gen),
            ("async update / sync update", async_update, update),
            ("async train / sync train (no sync)", async_train, sync_train),
            ("sync: weight sync / update", weight_sync, update)]
    print(f"load average (1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"{'name':40s} {'ours':>9s} {'ref':>9s} {'ratio':>7s}")
    for name, ours, ref in rows:
        print(f"{name:40s} {ours:9.3f} {ref:9.3f} {ours / ref:7.3f}")
    print(json.dumps({"bench": "async_rollout", "steps": a.steps, "prompts": a.prompts, "samples": a.samples,
                      "new_tokens": a.new_tokens, "servers": a.servers, "rounds": a.rounds,
                      "weight_sync": a.weight_sync,
                      "gen_s": gen, "update_s": update, "train_s": sync_train,
                      "weight_sync_s": weight_sync, "sync_step_s": sync_step, "async_step_s": async_step,
                      "async_over_max": async_step / max(gen, update), "async_over_sync": async_step / sync_step,
                      "async_exposed_rollout_s": async_wait,
                      "async_staleness": staleness, "load_1min": [load_start, os.getloadavg()[0]]}))


if __name__ == "__main__":
    main()
