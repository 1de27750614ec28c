"""Rollout-forward reuse (megaent.model.tape): an update whose forward reads the decode's recorded linear outputs
has the gradient of a plain update.

Reference: the same `train_mini_batch` (on-policy PPO, token-mean) over the same packed micro-batches with a plain
forward (`policy.replay_source = None`), itself checked against a plain HF implementation of the loss in
tests/test_peer_equivalence.py. The rollout is the embedded engine on the training policy (Qwen2 with QKV bias and a
tied head), prompts of different lengths (left padding in the decode batch) and stop tokens (samples of different
lengths, some never feed their last token; in one case every sample stops long before max_new_tokens). Checks,
at TP = 1 and TP = 2 (gloo):
- every micro-batch is replayed, and every parameter gradient matches the plain one (relative error <= 1e-4);
- the update's log-probs equal the rollout engine's sampled log-probs (<= 2e-5);
- a corrupted tape changes the gradient (the replay really reads it: a linear's output, the attention output
  and the attention log-sum-exp, each in turn), and a stale tape (any parameter changed in
  place after the rollout) is refused;
- the trainer (`Trainer.train_step`) with rollout.reuse_forward on and off ends the step with the same weights.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_forward_reuse.py
"""
import torch

from dist import run_ranks
from harness import KeepGrads
from hf_tiny import make_tiny_hf

VOCAB = 300


def _rollout_and_grads(rank, world, hf_dir, tp, max_new=8):
    from megaent.config.schema import LossConfig
    from megaent.model import load_hf
    from megaent.model.tape import ReplaySource
    from megaent.parallel import init_parallel
    from megaent.rollout.embedded import EmbeddedEngine
    from megaent.rollout.types import SamplingParams
    from megaent.trainer.batching import TrainSample, make_micro_batches, unpack_response
    from megaent.trainer.update import train_mini_batch

    torch.manual_seed(0)
    st = init_parallel(tp, 1)
    policy = load_hf(hf_dir, st)
    engine = EmbeddedEngine(policy, st, seed=1, record_tapes=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    params = SamplingParams(n=3, max_new_tokens=max_new, temperature=1.0, stop_token_ids=tuple(range(20, 50)),
                            seed=7)
    groups = engine.generate(prompts, params)
    gen = torch.Generator().manual_seed(3)
    samples, rows, rollout_lp = [], {}, {}
    for i, g in enumerate(groups):
        for j, s in enumerate(g):
            uid = i * 3 + j
            samples.append(TrainSample(tokens=torch.tensor(s.prompt_ids + s.output_ids), prompt_len=len(s.prompt_ids),
                                       advantage=float(torch.randn(1, generator=gen)), group=i, uid=uid))
            rows[uid] = engine.tape_row(s)
            rollout_lp[uid] = torch.tensor(s.logprobs)
    lengths = sorted(len(s.output_ids) for g in groups for s in g)
    cfg = LossConfig(policy_loss="ppo", loss_agg="token_mean")

    def update(source):
        mbs = make_micro_batches(samples, max_tokens=40, dp_group=st.dp_group)
        policy.replay_source = source
        hits = [source.indices(mb) is not None for mb in mbs] if source is not None else []
        opt = KeepGrads(policy)
        train_mini_batch(policy, opt, mbs, loss_cfg=cfg, state=st, old_from_current=True)
        policy.replay_source = None
        lps = {}
        for mb in mbs:
            lps.update(unpack_response(mb.logprobs, mb))
        return opt.grads, hits, lps, len(mbs)

    plain, _, _, n_mb = update(None)
    replayed, hits, lps, _ = update(ReplaySource(policy, rows=rows))
    lp_err = max(float((lps[u] - rollout_lp[u]).abs().max()) for u in lps)
    rel = [float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(replayed, plain)]

    tape = rows[0][0]
    for bufs in tape.act:  # corrupt one linear's recorded outputs: the replayed gradient must move
        bufs["gate_up"].mul_(1.5)
    corrupted, _, _, _ = update(ReplaySource(policy, rows=rows))
    moved = max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(corrupted, plain))
    # fp32 CPU: the attention output (read by the forward) and its log-sum-exp (read by the flash backward) are
    # recorded too; corrupting either must move the gradient again.
    moved_attn = {}
    assert tape.has_attention
    for name, corrupt in (("attn", lambda t: t.mul_(1.5)), ("lse", lambda t: t.add_(0.5))):
        for bufs in tape.act:
            corrupt(bufs[name])
        again, _, _, _ = update(ReplaySource(policy, rows=rows))
        moved_attn[name] = max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(again, corrupted))
        corrupted = again
    with torch.no_grad():
        next(policy.parameters()).add_(0.0)  # an in-place update bumps the version: the tape is stale
    mbs = make_micro_batches(samples, max_tokens=40, dp_group=st.dp_group)
    stale = [ReplaySource(policy, rows=rows).indices(mb) for mb in mbs]
    return dict(rel=rel, hits=hits, lp_err=lp_err, moved=moved, moved_attn=moved_attn, stale=stale, lengths=lengths,
                n_mb=n_mb,
                have_rows=all(r is not None for r in rows.values()))


def _check(res, max_new=8):
    assert res["have_rows"], "every sample should be recorded"
    assert res["n_mb"] > 1 and res["hits"] and all(res["hits"]), res["hits"]
    assert len(set(res["lengths"])) > 1, res["lengths"]  # stops: rows compacted away mid-decode
    if max_new == 8:
        assert max(res["lengths"]) == 8, res["lengths"]  # and samples that ran to the end
    else:
        assert max(res["lengths"]) < max_new, res["lengths"]  # every row stopped: the decode ended early
    assert max(res["rel"]) <= 1e-4, res["rel"]
    assert res["lp_err"] <= 2e-5, res["lp_err"]
    assert res["moved"] > 1e-3, res["moved"]
    assert min(res["moved_attn"].values()) > 1e-3, res["moved_attn"]
    assert all(s is None for s in res["stale"])


def test_replayed_update_matches_plain_tp1(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "hf", family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2,
                              vocab_size=VOCAB, weight_std=0.05, seed=3))
    _check(run_ranks(_rollout_and_grads, 1, hf_dir, 1)[0])


def test_replayed_update_matches_plain_when_every_sample_stops_early(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "hf", family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2,
                              vocab_size=VOCAB, weight_std=0.05, seed=3))
    _check(run_ranks(_rollout_and_grads, 1, hf_dir, 1, 60)[0], 60)


def test_replayed_update_matches_plain_tp2(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "hf", family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2,
                              vocab_size=VOCAB, weight_std=0.05, seed=3))
    for res in run_ranks(_rollout_and_grads, 2, hf_dir, 2):
        _check(res)


class _Prompts:
    """Prompt stream of fixed token lists (the trainer's `next_batch` / state interface)."""

    def __init__(self, n: int) -> None:
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(11)
        self.items = [SimpleNamespace(ids=torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                        generator=g).tolist(), text="", answer="") for _ in range(n)]
        self.index = 0

    def next_batch(self):
        out = [self.items[(self.index + i) % len(self.items)] for i in range(4)]
        self.index += 4
        return out

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, sd):
        self.index = sd["index"]


class _Scorer:
    def score(self, texts, answers):
        return [float(sum(map(ord, t)) % 7) / 7.0 for t in texts], 0

    def take_metrics(self):
        return {}

    def close(self):
        pass


def _train_steps(rank, world, hf_dir, run_dir, reuse, loss):
    from megaent.config import load_config
    from megaent.parallel import init_parallel
    from megaent.trainer.trainer import Trainer

    st = init_parallel(1, 1)
    cfg = load_config(None, [f"model.path={hf_dir}", f"trainer.run_dir={run_dir}", "trainer.steps=2",
                             "trainer.prompts_per_step=4", "trainer.mini_batch_size=4", "trainer.quiet=true",
                             "trainer.checkpoint_every=0", "trainer.dynamics_every=1", "rollout.n_samples=3",
                             "rollout.max_new_tokens=6", "optimizer.lr=1e-3", f"rollout.reuse_forward={reuse}",
                             f"algorithm.policy_loss={loss}", "algorithm.clip_cov_ratio=0.05",
                             "algorithm.clip_cov_lb=0.0", "algorithm.kl_cov_ratio=0.05",
                             "algorithm.group_filter=false"])
    tr = Trainer(cfg, run_dir=__import__("pathlib").Path(run_dir), state=st)
    tr.prompts, tr.scorer = _Prompts(8), _Scorer()
    from megaent.trainer.metrics import MetricsSink

    tr.sink = MetricsSink(tr.run_dir, enabled=False, wandb_project="", run_name="t")
    calls = []
    orig = tr.rollout.replay_source
    tr.rollout.replay_source = lambda mine: calls.append(orig(mine)) or calls[-1]
    init = [p.detach().clone() for p in tr.policy.parameters()]
    metrics = [tr.train_step(s) for s in (1, 2)]
    params = [p.detach().clone() for p in tr.policy.parameters()]
    return dict(metrics=metrics, params=params, init=init, sources=[c is not None for c in calls])


def test_trainer_steps_with_and_without_reuse_agree(tmp_path):
    """Two full trainer steps (rollout, update, entropy dynamics) per objective: reuse on == reuse off."""
    hf_dir = str(make_tiny_hf(tmp_path / "hf", family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2,
                              vocab_size=VOCAB, weight_std=0.05, seed=3))
    for loss in ("ppo", "clip_cov"):
        on = run_ranks(_train_steps, 1, hf_dir, str(tmp_path / f"on_{loss}"), "true", loss)[0]
        off = run_ranks(_train_steps, 1, hf_dir, str(tmp_path / f"off_{loss}"), "false", loss)[0]
        assert all(on["sources"]) and not any(off["sources"]), (on["sources"], off["sources"])
        # Adam normalises each element's step, so near-zero gradients amplify rounding: compare the two runs'
        # difference with the size of the update itself (a wrong gradient moves it by O(1)).
        for a, b, w0 in zip(on["params"], off["params"], off["init"]):
            assert float((a - b).norm()) <= 1e-2 * float((b - w0).norm()) + 1e-7, loss
        for ma, mb in zip(on["metrics"], off["metrics"]):
            for key in ("actor/loss", "grad_norm", "entropy/mean", "cov/mean", "reward/mean"):
                assert abs(ma[key] - mb[key]) <= 1e-4 * (1.0 + abs(mb[key])), (loss, key, ma[key], mb[key])
