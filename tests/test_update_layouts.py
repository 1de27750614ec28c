"""Acceptance: one RL update (Clip-Cov, several micro-batches) on a tiny Qwen2 matches a plain single process.

Reference (written here, no megaent code): the HF `transformers` Qwen2 model, per-sample forward,
`log_softmax`, the Clip-Cov loss spelled out (centred covariance over all valid tokens in fp64,
candidates lb < c < ub that PPO did not clip, k = max(1, floor(r * N)) of them picked by the documented
counter-based priority hash of (seed, token uid), re-implemented below in plain Python ints), token-mean
over the whole mini-batch, `clip_grad_norm_`, `torch.optim.AdamW` (decay on matrices only).
megaent, on megatron-core's engine (GPTModel with sequence parallel at TP = 2, DDP, `get_megatron_optimizer`
with the distributed optimizer whenever DP > 1, `get_forward_backward_func`): `load_hf(engine="mcore")` on
layouts (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2), (2,2,1), (1,2,2), (2,1,2)
(gloo ranks), `scatter_samples` -> `make_micro_batches` -> `compute_logprobs` -> `train_mini_batch` ->
`save_hf`. Checks: log-probs of packed micro-batches, the global grad norm, and every parameter after
the step within 1e-5 (fp32; Adam's eps is 1e-6 so that grads at round-off level cannot flip an update of
size lr), and gradient accumulation over 1, 2 and 4 micro-batches giving the same update.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_update_layouts.py   (about 2-4 minutes on 2 cores)
"""
from __future__ import annotations

import math

import pytest
import torch

from dist import run_ranks

UID_STRIDE = 1 << 24  # megaent's documented token uid: sample_uid * 2**24 + position
LR, WD, EPS, CLIP = 1e-3, 0.1, 1e-6, 1.0
CC = dict(clip_cov_ratio=0.05, clip_cov_lb=0.05, clip_cov_ub=5.0, clip_ratio_low=0.2, clip_ratio_high=0.2)
GEN_SEED = 1234
_M = 0xFFFFFFFF


def _mix32(x: int) -> int:  # lowbias32 (Wellons, hash-prospector)
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M
    return x ^ (x >> 16)


def _priority(uid: int, seed: int) -> int:
    return _mix32((uid & _M) ^ _mix32((uid >> 32) ^ _mix32(seed & _M)))


def make_data(n_groups: int = 4, g: int = 2, vocab: int = 1001, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    data = []
    for k in range(n_groups * g):
        L = int(torch.randint(6, 14, (1,), generator=gen))
        p = int(torch.randint(2, 5, (1,), generator=gen))
        data.append(dict(tokens=torch.randint(4, vocab, (L,), generator=gen), prompt_len=p, group=k // g, uid=k,
                         advantage=float(torch.randn(1, generator=gen)), noise=0.3 * torch.randn(L - p, generator=gen)))
    return data


def reference_update(hf_dir: str, data: list[dict]) -> dict:
    """Plain single-process Clip-Cov update; returns logprobs, grad norm and the updated HF state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    lps, olds, advs, uids = [], [], [], []
    for d in data:
        logits = model(d["tokens"][None]).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, d["tokens"][1:, None])[:, 0][d["prompt_len"] - 1:]
        lps.append(lp)
        olds.append(lp.detach() + d["noise"])
        advs.append(torch.full_like(lp, d["advantage"]))
        uids += [d["uid"] * UID_STRIDE + i for i in range(d["prompt_len"] - 1, len(d["tokens"]) - 1)]
    lp, old, adv = torch.cat(lps), torch.cat(olds), torch.cat(advs)
    n = lp.numel()
    lp64, a64 = lp.detach().double(), adv.double()
    cov = ((a64 - a64.mean()) * (lp64 - lp64.mean())).float()
    ratio = torch.exp(lp - old)
    unclipped = -adv * ratio
    clipped_branch = -adv * ratio.clamp(1 - CC["clip_ratio_low"], 1 + CC["clip_ratio_high"])
    cand = [i for i in range(n) if not bool(clipped_branch[i] > unclipped[i])
            and CC["clip_cov_lb"] < float(cov[i]) < CC["clip_cov_ub"]]
    seed = int(torch.randint(1 << 31, (), generator=torch.Generator().manual_seed(GEN_SEED), dtype=torch.int64))
    k = max(1, math.floor(n * CC["clip_cov_ratio"]))
    chosen = sorted(cand, key=lambda i: (_priority(uids[i], seed), uids[i]))[:k]
    keep = torch.ones(n)
    keep[chosen] = 0.0
    loss = (torch.maximum(unclipped, clipped_branch) * keep).sum() / n
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, eps=EPS)
    opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(logprobs={d["uid"]: l.detach() for d, l in zip(data, lps)}, norm=float(norm), state=sd,
                n_selected=len(chosen), n_cand=len(cand), olds={d["uid"]: o for d, o in zip(data, olds)})


def _run_layout(tp, pp, hf_dir, data, olds, out_dir, max_tokens):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megaent.config.schema import LossConfig
    from megaent.model import load_hf, save_hf
    from megaent.parallel import init_parallel
    from megaent.trainer.batching import TrainSample, make_micro_batches, scatter_samples
    from megaent.trainer.mcore_engine import build_engine
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(tp, pp)
    policy = load_hf(hf_dir, st, engine="mcore")  # sequence parallel on with TP > 1
    # megatron-core DDP + optimizer; the distributed optimizer is on whenever DP > 1
    engine = build_engine(policy, st, lr=LR, weight_decay=WD, eps=EPS, clip_grad=CLIP)
    assert policy.config.sequence_parallel == (tp > 1)
    multiple = tp if policy.config.sequence_parallel else 1

    def micro_batches(mine):
        mbs = make_micro_batches(mine, max_tokens=max_tokens, dp_group=st.dp_group, share_prefix=False,
                                 multiple=multiple, device=st.device)
        return [mb.to(st.device) for mb in mbs]

    samples = None
    if st.rank == 0:
        samples = [TrainSample(tokens=d["tokens"], prompt_len=d["prompt_len"], advantage=d["advantage"],
                               group=d["group"], uid=d["uid"]) for d in data]
    mine = scatter_samples(samples, dp_rank=st.dp_rank, dp=st.dp)
    mbs = micro_batches(mine)
    lps = compute_logprobs(engine, mbs, state=st, fill_old=True, samples=mine)
    for s in mine:  # the rollout's old log-probs differ from the current ones (PPO clipping matters)
        s.old_logprobs = olds[s.uid]
    mbs = micro_batches(mine)
    cfg = LossConfig(policy_loss="clip_cov", **CC)
    stats = train_mini_batch(engine, mbs, loss_cfg=cfg, state=st, generator=torch.Generator().manual_seed(GEN_SEED))
    stats["distributed_optimizer"] = float(hasattr(engine.optimizer.chained_optimizers[0]
                                                   if hasattr(engine.optimizer, "chained_optimizers")
                                                   else engine.optimizer, "model_param_group_index_map"))
    path = f"{out_dir}/tp{tp}pp{pp}-{max_tokens}"
    save_hf(policy, st, path)
    n_mb = torch.tensor([len([m for m in mbs if not m.is_empty])])
    dist.all_reduce(n_mb)
    sd = None
    if st.rank == 0:
        import glob

        sd = {}
        for f in glob.glob(f"{path}/*.safetensors"):
            sd.update(load_file(f))
    return dict(lps=lps, stats=stats, sd=sd, n_mb=int(n_mb) // (tp * pp))


def _world(rank, world, layouts, hf_dir, data, olds, out_dir):
    return {(tp, pp, mt): _run_layout(tp, pp, hf_dir, data, olds, out_dir, mt) for tp, pp, mt in layouts}


def key_dp(key, world):
    tp, pp, _ = key
    return world // (tp * pp)


def _check(results, ref, layouts):
    for rank, per_rank in enumerate(results):
        for key, r in per_rank.items():
            for uid, (lp, _) in r["lps"].items():
                assert (lp - ref["logprobs"][uid]).abs().max() < 1e-5, (key, rank, uid)
            assert abs(r["stats"]["grad_norm"] - ref["norm"]) < 1e-5 * max(1.0, ref["norm"]), (key, r["stats"])
            assert r["stats"]["skipped"] == 0.0
            assert r["stats"]["distributed_optimizer"] == float(key_dp(key, len(results)) > 1), key
    for key in layouts:
        sd = results[0][key]["sd"]
        assert set(sd) >= {k for k in ref["state"] if k != "lm_head.weight"}, key
        err = max(float((sd[k] - v).abs().max()) for k, v in ref["state"].items() if k in sd)
        assert err <= 1e-5, (key, err)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hf_tiny import make_tiny_hf

    d = tmp_path_factory.mktemp("upd")
    hf_dir = str(make_tiny_hf(d / "hf", family="qwen2", hidden=32, layers=4, heads=4, kv_heads=2, seed=1))
    data = make_data()
    ref = reference_update(hf_dir, data)
    assert 0 < ref["n_selected"] < ref["n_cand"], "test data must make Clip-Cov choose among candidates"
    return hf_dir, data, ref, str(d)


@pytest.mark.slow
def test_world1_and_grad_accumulation(setup):
    hf_dir, data, ref, out = setup
    from megaent.trainer.batching import split_token_balanced

    lens = [len(d["tokens"]) for d in data]
    budget = {}  # the largest token budgets that give 1, 2 and 4 micro-batches (checked below)
    for b in range(sum(lens), max(lens) - 1, -1):
        budget.setdefault(len(split_token_balanced(lens, max_tokens=b)), b)
    layouts = [(1, 1, budget[1]), (1, 1, budget[2]), (1, 1, budget[4])]
    res = run_ranks(_world, 1, layouts, hf_dir, data, ref["olds"], out)
    assert [res[0][k]["n_mb"] for k in layouts] == [1, 2, 4]
    _check(res, ref, layouts)


@pytest.mark.slow
def test_world2_layouts(setup):
    hf_dir, data, ref, out = setup
    layouts = [(2, 1, 40), (1, 2, 40), (1, 1, 40)]
    _check(run_ranks(_world, 2, layouts, hf_dir, data, ref["olds"], out), ref, layouts)


@pytest.mark.slow
def test_world4_layouts(setup):
    hf_dir, data, ref, out = setup
    layouts = [(2, 2, 40), (1, 2, 40), (2, 1, 40)]
    _check(run_ranks(_world, 4, layouts, hf_dir, data, ref["olds"], out), ref, layouts)
