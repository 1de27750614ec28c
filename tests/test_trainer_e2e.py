"""End-to-end `megaent train` on CPU: run directory contents, exact resume after kill -9 (metrics of the
following steps, the entropy controller's included, equal an uninterrupted run bitwise), TP=2 / PP=2 first-step metrics equal TP=1, HF export loads
in `transformers` and generates, one sample per prompt passes the group filter, and user errors exit 2 with one
line.
References: an uninterrupted run of the same config (resume), the TP=1 run (layouts), `transformers` (export).
The policy is the demo's warmed tiny Llama (built once per session; cached in MEGAENT_CACHE).
Run: pytest tests/test_trainer_e2e.py  (slow: ~minutes)
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["rollout.n_samples=4", "rollout.max_new_tokens=6", "trainer.prompts_per_step=4",
         "trainer.mini_batch_size=2", "trainer.checkpoint_every=1", "trainer.quiet=true",
         "algorithm.policy_loss=clip_cov", "algorithm.clip_cov_ratio=0.01", "algorithm.clip_cov_lb=0.1",
         "optimizer.lr=1e-3", "trainer.keep_last=5"]
VOLATILE = ("time/", "tokens_per_s")


@pytest.fixture(scope="session")
def demo_policy(tmp_path_factory):
    from megaent.data.warmup import warmup_policy
    from megaent.trainer.components import demo_policy_dir

    from megaent.config import Config

    c = Config()  # the schema's demo defaults
    out = demo_policy_dir("arith", 0, digits=c.data.task_max_digits, steps=c.model.demo_warmup_steps)
    return str(warmup_policy(out, seed=0, steps=c.model.demo_warmup_steps, max_digits=c.data.task_max_digits))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def _train(args, **kw):
    return subprocess.run([sys.executable, "-m", "megaent.cli", "train", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900, **kw)


def _torchrun(n, args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           "-m", "megaent.cli", "train", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)


def _metrics(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.slow
def test_resume_after_kill9_is_exact_and_export_loads(tmp_path, demo_policy):
    # The entropy controller is on (Clip-Cov's r steered to a target above the policy's entropy): its state must
    # come back from the checkpoint for the resumed metrics to match.
    ctrl = ["algorithm.target_entropy=1.0", "trainer.dynamics_every=1"]
    base = ["configs/demo.yaml", f"model.path={demo_policy}", "trainer.steps=4", *SMALL, *ctrl]
    ref = tmp_path / "ref"
    p = _train([*base, f"trainer.run_dir={ref}"])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _metrics(ref)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward/mean", "reward/std", "entropy/mean", "cov/mean", "cov/top_0.02pct", "grad_norm", "lr",
                "response/length_mean", "actor/selected_frac"):
        assert key in rows[0], key
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "tb", "checkpoints", "hf_final"} <= {
        x.name for x in ref.iterdir()}
    assert any(r["grad_norm"] > 0 for r in rows), "the policy never got a gradient: the test would prove nothing"
    used = [r["controller/clip_cov_ratio_used"] for r in rows]
    assert used[0] == pytest.approx(0.01) and used[2] != pytest.approx(0.01), used  # step 3 after a resume starts from the saved ratio
    assert all(1e-5 <= u <= 0.1 for u in used) and all(r["controller/target_entropy"] == 1.0 for r in rows)
    assert all(r["controller/clip_cov_ratio"] == n for r, n in zip(rows, used[1:])), "next ratio = ratio used next"

    # Kill -9 once step 2's checkpoint is complete, then resume.
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "megaent.cli", "train", *base, f"trainer.run_dir={run}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step_000002" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its step-2 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = _train(["--resume", str(run)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _metrics(run) == rows  # bitwise equal, no gap, no repeat

    # The exported policy loads in transformers and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run / "hf_final"))
    tok = AutoTokenizer.from_pretrained(str(run / "hf_final"))
    ids = tok("12+34=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_tp2_and_pp2_first_step_match_tp1(tmp_path, demo_policy):
    base = ["configs/demo.yaml", f"model.path={demo_policy}", "trainer.steps=1", "trainer.dynamics_every=1", *SMALL]
    ref = _train([*base, f"trainer.run_dir={tmp_path / 'tp1'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _metrics(tmp_path / "tp1")[0]
    assert want["dynamics/exact_pred_dH"] != 0 and want["dynamics/exact_dH"] != 0  # the exact probe ran (and
    # below, its sampled positions, vocab-parallel op and pipeline broadcast give TP=1's values at TP=2 / PP=2)
    for name, layout in (("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"])):
        p = _torchrun(2, [*base, *layout, f"trainer.run_dir={tmp_path / name}"])
        assert p.returncode == 0, p.stderr[-3000:]
        got = _metrics(tmp_path / name)[0]
        assert got["reward/mean"] == want["reward/mean"] and got["tokens"] == want["tokens"], name
        for key, value in want.items():
            if key.startswith("rollout/logprob_diff"):  # trainer vs engine rounding: ~0 when the update reuses
                assert got[key] <= 1e-4 and value <= 1e-4, (name, key)  # the decode's forward, else ~1e-6
            elif isinstance(value, float) and key != "rollout/sync_shared":
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)


@pytest.mark.slow
def test_one_sample_per_prompt_keeps_every_prompt_with_the_group_filter_on(tmp_path, demo_policy):
    # A group of one sample has nothing to compare: the DAPO filter must not drop it (it used to drop all,
    # roll out 4 rounds and train on nothing).
    p = _train(["configs/demo.yaml", f"model.path={demo_policy}", "trainer.steps=1", *SMALL, "rollout.n_samples=1",
                "algorithm.group_filter=true", "algorithm.advantage=reinforce_pp", "algorithm.policy_loss=ppo",
                f"trainer.run_dir={tmp_path / 'g1'}"])
    assert p.returncode == 0, p.stderr[-3000:]
    m = _metrics(tmp_path / "g1")[0]
    assert m["group_filter/rounds"] == 1.0 and m["group_filter/kept_frac"] == 1.0
    assert m["group_filter/batch_full"] == 1.0 and m["tokens"] > 0


@pytest.mark.parametrize("args,needle", [
    (["optimizer.lrr=1"], "did you mean `optimizer.lr`"),
    (["data.path=/nonexistent/prompts.jsonl"], "data.path"),
    (["model.path=/nonexistent/model"], "model.path"),
    (["trainer.run_dir=/proc/cannot/write"], "trainer.run_dir"),
    (["model.backend=te"], "model.backend=te"),
])
def test_user_errors_exit_2_with_one_line(args, needle):
    p = _train(["configs/demo.yaml", *args])
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
