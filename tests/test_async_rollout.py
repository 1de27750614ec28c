"""Asynchronous rollouts (rollout.async_steps=1) against a `megaent serve` subprocess: staleness, behaviour
log-probs, exact resume.

References: the server itself put back on the initial weights (step 2's batch, made during step 1's update,
must be what the initial policy samples with step 2's seed); an uninterrupted run of the same config (a run
resumed from step 1's checkpoint, which holds the prefetched batch of step 2, must log the same metrics
bitwise); the sampler's log-probs (at step 1 the trainer's recomputed ones equal them to float noise, later
they differ by the one update between sampler and learner).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_async_rollout.py
"""
import json
import shutil
from pathlib import Path

import pytest

from megaent.parallel.launch import free_port
from megaent.rollout.launcher import launch_megaent

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time/", "tokens_per_s")


@pytest.fixture(scope="module")
def demo_policy():
    from megaent.config import Config
    from megaent.data.warmup import warmup_policy
    from megaent.trainer.components import demo_policy_dir

    c = Config()
    out = demo_policy_dir("arith", 0, digits=c.data.task_max_digits, steps=c.model.demo_warmup_steps)
    return str(warmup_policy(out, seed=0, steps=c.model.demo_warmup_steps, max_digits=c.data.task_max_digits))


@pytest.fixture(scope="module")
def server(demo_policy, tmp_path_factory):
    group = launch_megaent(demo_policy, ports=[free_port()], log_dir=tmp_path_factory.mktemp("logs"),
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=240)
    yield group
    group.stop()


def _config(demo_policy, url, run_dir):
    from megaent.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.path={demo_policy}", "trainer.steps=3", "trainer.prompts_per_step=4", "trainer.mini_batch_size=2",
        "trainer.ppo_epochs=1", "rollout.n_samples=4", "rollout.max_new_tokens=4", "trainer.checkpoint_every=1",
        "trainer.keep_last=5", "trainer.quiet=true", "trainer.dynamics_every=0", "optimizer.lr=2e-3",
        "rollout.engine=http", f"rollout.urls=[{url}]", "rollout.async_steps=1", f"trainer.run_dir={run_dir}"])


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_async_run_is_one_step_stale_and_resumes_exactly(server, demo_policy, tmp_path):
    from megaent.rollout.client import SGLangClient
    from megaent.trainer.components import build_prompts, derive_seed, eos_ids, load_tokenizer
    from megaent.trainer.rollout_phase import RolloutPhase
    from megaent.trainer.run import resume, train

    url = server.urls[0]
    client = SGLangClient([url])
    ref = tmp_path / "ref"
    cfg = _config(demo_policy, url, ref)
    assert train(cfg) == 0
    rows = _rows(ref)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["rollout/logprob_diff_max"] < 1e-4  # same weights: the ratio starts at 1
    assert rows[1]["rollout/logprob_diff_mean"] > 1e-4  # one update between sampler and learner
    assert any(r["grad_norm"] > 0 for r in rows)

    # Step 2's batch came from the initial weights, with step 2's seeds.
    client.update_weights_from_disk(demo_policy)
    tok = load_tokenizer(Path(demo_policy))
    prompts = build_prompts(cfg.data, tok, seed=cfg.trainer.seed, batch_size=cfg.trainer.prompts_per_step)
    prompts.next_batch()
    step2 = prompts.next_batch()
    phase = RolloutPhase.__new__(RolloutPhase)  # only its sampling parameters: the trainer's own request
    phase.cfg, phase.eos, phase.seed = cfg.rollout, eos_ids(tok, Path(demo_policy)), cfg.trainer.seed
    params = phase.params(seed=derive_seed(cfg.trainer.seed, 2, 0))
    got = client.generate([list(p.ids) for p in step2], params)
    logged = [json.loads(line) for line in (ref / "samples.jsonl").read_text().splitlines() if line]
    want = [s for s in logged if s["step"] == 2]
    assert want, "samples.jsonl holds step 2's samples"
    for s in want:
        k = next(i for i, p in enumerate(step2) if p.text == s["prompt"])
        assert tok.decode(got[k][0].output_ids) == s["response"], s

    # Resume from step 1's checkpoint (it holds step 2's prefetched batch): steps 2 and 3 as uninterrupted.
    run = tmp_path / "resumed"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("step_000002", "step_000003", "hf_final"))
    client.update_weights_from_disk(demo_policy)  # whatever the server holds: the resume syncs step 1's weights
    assert resume(str(run)) == 0
    assert _rows(run) == rows
