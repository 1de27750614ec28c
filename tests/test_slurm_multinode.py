"""The rendered multi-node job on a real 3-node Slurm cluster (slurm/netns_cluster.sh): 2 training + 1 rollout node.

One job, submitted as a user would (`megaent submit CONFIG --nodes 2 --rollout-nodes 1 ...`, the console script),
trains configs/demo.yaml's policy with DP=2 (one gloo rank on each of mgnode1 and mgnode2, meeting at mgnode1's
address) from rollouts that `megaent serve` (slurm.rollout_server_cmd) answers over HTTP on mgnode3, weights
synced to it after every step. Through its life:
- USR1 (`scancel --signal=USR1 --batch`) -> checkpoint, exit 3, requeue, resume;
- then mgnode2's trainer rank is SIGKILLed mid-run -> the job must fail within a bound (no hang);
- a resubmission of the same command resumes from the last complete checkpoint and finishes.
What it compares against: the same config on one node with the same layout (DP=2: `torch.distributed.run
--nproc-per-node=2`, rollouts from a local `megaent serve`), run alongside. Every step 1..N must be logged once
(no gap, no repeat across the requeue and the resubmission) and equal the reference within the tolerance of the
single-node layout tests (tests/test_trainer_e2e.py: rel 1e-4, abs 1e-6).
Fast part (always runs): `slurm.rollout_server_cmd` renders and validates.

Gated like tests/test_slurm_cluster.py (it creates network namespaces, a bridge and Slurm daemons as root):

    MEGAENT_SLURM_TESTS=1 OMP_NUM_THREADS=1 python -m pytest tests/test_slurm_multinode.py -q -s
    bash slurm/netns_cluster.sh stop      # only if you started it by hand (the fixture stops what it started)

Measured times print with `-s`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from megaent.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SCRIPT = REPO / "slurm" / "netns_cluster.sh"
SLURM_CONF = "/etc/slurm-megaent-multi/slurm.conf"
ENABLE = "MEGAENT_SLURM_TESTS"
SERVE = "megaent serve --model {model} --host 0.0.0.0 --port {port}"
STEPS = 10
SMALL = [f"trainer.steps={STEPS}", "rollout.n_samples=4", "rollout.max_new_tokens=4", "trainer.prompts_per_step=4",
         "trainer.mini_batch_size=2", "trainer.ppo_epochs=1", "trainer.checkpoint_every=1", "trainer.keep_last=20",
         "trainer.samples_to_log=0", "trainer.dynamics_every=0", "parallel.timeout_s=30"]
VOLATILE = ("time/", "tokens_per_s")


# ---------------------------------------------------------------- fast: the server command renders and validates
def test_rollout_server_cmd_renders_and_is_validated() -> None:
    from megaent.slurm.render import job_spec, render_sbatch

    cfg = load_config(DEMO, ["model.path=/m/tiny", f"slurm.rollout_server_cmd={SERVE}", "slurm.rollout_port=31000",
                             "slurm.gpus_per_node=0", "slurm.tasks_per_node=1", "slurm.rollout_nodes=1"])
    script = render_sbatch(job_spec(cfg, config_path="/c.yaml", run_dir="/r", workdir="/w"))
    assert "\n     megaent serve --model /m/tiny --host 0.0.0.0 --port 31000 &\n" in script
    assert "--url" not in script and "sglang" not in script
    # Each server is a world of one, away from the trainer's rendezvous (MASTER_ADDR = first training node) and
    # from the other servers (Slurm numbers the tasks of the server step 0..M-1).
    assert "MASTER_ADDR=127.0.0.1 MASTER_PORT=31001 RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 \\\nsrun --nodes=1" in script
    from megaent.parallel.launch import read_launch_env

    world = dict(kv.split("=") for kv in "MASTER_ADDR=127.0.0.1 MASTER_PORT=31001 RANK=0 WORLD_SIZE=1".split())
    env = read_launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "mgnode[2-3]", **world})
    assert (env.rank, env.world_size, env.master_addr) == (0, 1, "127.0.0.1")
    default = load_config(DEMO, ["model.path=/m/tiny", "slurm.gpus_per_node=0", "slurm.tasks_per_node=1",
                                 "slurm.rollout_nodes=1"])
    assert "python -m megaent.cli serve --model /m/tiny" in render_sbatch(
        job_spec(default, config_path="/c.yaml", run_dir="/r", workdir="/w"))
    for bad in ("megaent serve --model {model}", "serve --port {port} --tp {tp}"):
        with pytest.raises(ConfigError, match=r"slurm.rollout_server_cmd=.*needs \{port\}"):
            load_config(DEMO, [f"slurm.rollout_server_cmd={bad}"])


# ---------------------------------------------------------------- the 3-node job
@pytest.fixture(scope="module")
def cluster() -> float:
    """Start the 3-node cluster (or find it running); stop it at the end if this module started it."""
    if os.geteuid() != 0:
        pytest.skip("the netns cluster needs root (ip netns, Slurm daemons)")
    if shutil.which("slurmd") is None:  # local_cluster.sh installs the packages
        proc = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "start"], capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"slurm/netns_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    took = time.monotonic() - t0
    print(f"\n[slurm-multi] cluster start: {took:.1f} s ({proc.stderr.strip().splitlines()[-1]})")
    yield took
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def slurm_env() -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": SLURM_CONF, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env=slurm_env()).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def done(job_id: str) -> bool:
    return job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str, job_id: str, run_dir: Path) -> float:
    """Poll `pred` every 0.1 s; returns the seconds it took, fails with the job's logs after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "logs").glob("*")))
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; job {job_info(job_id)}\n{logs}")


def submit(policy: str, run_dir: Path) -> str:
    """`megaent submit` (the console script) of the 2 + 1 node job; returns the job id."""
    cmd = [shutil.which("megaent") or "megaent", "submit", str(DEMO), "--nodes", "2", "--rollout-nodes", "1",
           "--gpus-per-node", "0", "--tasks-per-node", "1", "--time", "20", "--run-dir", str(run_dir),
           "--job-name", "megaent-multi", f"model.path={policy}", f"slurm.rollout_server_cmd={SERVE}", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=slurm_env())
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[0]
    assert job_id.isdigit(), proc.stdout
    return job_id


def node_pids(node: int, needle: str) -> list[int]:
    """Processes in node `node`'s network namespace whose command line contains `needle`."""
    out = subprocess.run(["ip", "netns", "pids", f"megaent-mgnode{node}"], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(pid)
    return pids


def last_complete_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    return max(steps, default=0)


def reference_run(policy: str, run_dir: Path, port: int) -> subprocess.Popen:
    """The same config on one node, same layout (DP=2 over 2 local gloo ranks), rollouts from a local server."""
    env = {k: v for k, v in slurm_env().items() if not k.startswith(("SLURM_", "MEGAENT_API_KEY"))}
    cmd = (f"megaent serve --model {policy} --host 127.0.0.1 --port {port} > {run_dir}.serve.log 2>&1 & S=$!; "
           f"trap 'kill $S' EXIT; "
           f"python -m megaent.slurm.rollout_hosts --hosts 127.0.0.1 --port {port} --out {run_dir}.hosts "
           f"--wait-s 300 >/dev/null && "
           f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 -m megaent.cli train "
           f"{DEMO} trainer.run_dir={run_dir} trainer.quiet=true model.path={policy} "
           f"{' '.join(SMALL)} rollout.engine=http rollout.urls=[http://127.0.0.1:{port}]")
    return subprocess.Popen(["bash", "-c", cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(f"{run_dir}.log", "w"), start_new_session=True)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    """The demo's warmed tiny policy (cached under MEGAENT_CACHE), as the HF directory the server loads."""
    from megaent.config import Config
    from megaent.data.warmup import warmup_policy
    from megaent.trainer.components import demo_policy_dir

    c = load_config(DEMO, [])
    assert isinstance(c, Config)
    out = demo_policy_dir(c.data.task, c.trainer.seed, digits=c.data.task_max_digits, steps=c.model.demo_warmup_steps)
    return str(warmup_policy(out, seed=c.trainer.seed, steps=c.model.demo_warmup_steps,
                             max_digits=c.data.task_max_digits))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(ENABLE) != "1", reason=(
    f"real Slurm on network namespaces (root); enable with {ENABLE}=1 or run bash tools/test.sh"))
def test_three_node_job_requeues_survives_a_lost_node_and_matches_one_node(
        cluster: float, policy: str, tmp_path: Path) -> None:
    from megaent.parallel.launch import free_port

    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    jobs: list[str] = []
    ref = reference_run(policy, ref_dir, free_port())
    try:
        t0 = time.monotonic()
        job_id = submit(policy, run_dir)
        jobs.append(job_id)
        # (b) USR1 once two steps are logged: checkpoint, exit 3, requeue, resume.
        t_first = wait_for(lambda: len(metrics(run_dir)) >= 2, 240, "2 trainer steps", job_id, run_dir)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, env=slurm_env())
        t_sig = time.monotonic()
        wait_for(lambda: int(job_info(job_id).get("Restarts", "0")) >= 1, 120, "the requeue", job_id, run_dir)
        cut = len(metrics(run_dir))
        assert cut < STEPS, f"the job finished ({cut} steps) before USR1 stopped it: the test proves nothing"
        # (c) after two more steps of the resumed run, mgnode2's trainer rank dies mid-run.
        wait_for(lambda: len(metrics(run_dir)) >= cut + 2, 240, "2 steps after the resume", job_id, run_dir)
        t_resumed = time.monotonic() - t_sig
        victims = node_pids(2, "megaent.cli train")
        assert victims, "no trainer process on mgnode2: the ranks did not spread over the nodes"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        killed_at = len(metrics(run_dir))
        wait_for(lambda: done(job_id), 90, "the job to fail after losing a rank", job_id, run_dir)
        t_fail = time.monotonic() - t_kill
        info = job_info(job_id)
        assert info["JobState"] == "FAILED" and info["Restarts"] == "1", info
        assert killed_at < STEPS, "the job finished before the rank was killed: the test proves nothing"
        resume_from = last_complete_checkpoint(run_dir)
        # ... and a resubmission of the same command resumes from the last complete checkpoint.
        job2 = submit(policy, run_dir)
        jobs.append(job2)
        wait_for(lambda: done(job2), 300, "the resubmitted job", job2, run_dir)
        info2 = job_info(job2)
        assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", info2
        wall = time.monotonic() - t0
        assert ref.wait(timeout=300) == 0, (ref_dir.parent / "ref.log").read_text()[-3000:]
    finally:
        for jid in jobs:
            if not done(jid):
                subprocess.run(["scancel", jid], capture_output=True, env=slurm_env())
        if ref.poll() is None:
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()

    batch = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "train nodes: mgnode1,mgnode2  rollout nodes: mgnode3  master: mgnode1:" in batch, batch
    assert "trainer exited with 3" in batch and "requeueing" in batch and "restart 1" in batch, batch
    rank0 = (run_dir / "logs" / f"{job2}-0.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{resume_from:06d}'}" in rank0, rank0[-3000:]
    assert (run_dir / "rollout_hosts.txt").read_text() == "http://mgnode3:30000\n"
    got, want = metrics(run_dir), metrics(ref_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1)), \
        f"steps in metrics.jsonl: {[m['step'] for m in got]} (gap, repeat or lost rows)"
    assert [m["step"] for m in want] == list(range(1, STEPS + 1))
    assert any(m["grad_norm"] > 0 for m in want), "no gradient: the comparison would prove nothing"
    worst = 0.0
    for g, w in zip(got, want):
        for key, value in w.items():
            if isinstance(value, float) and not key.startswith(VOLATILE):
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (g["step"], key, g[key], value)
                worst = max(worst, abs(g[key] - value))
    print(f"\n[slurm-multi] submit -> first 2 steps {t_first:.1f} s; USR1 -> 2 resumed steps {t_resumed:.1f} s; "
          f"rank killed after {killed_at} steps -> job FAILED {t_fail:.1f} s; resubmitted from step {resume_from}; "
          f"{STEPS} steps done {wall:.1f} s after the first submit; max |2-node - 1-node| over all metrics {worst:.3g}")
