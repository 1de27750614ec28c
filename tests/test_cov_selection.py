"""Per-token covariance and the Clip-Cov / KL-Cov selections against a plain single-process reference
written here (Python integers for the hash, sorted Python lists for the top-k, float64 numpy-style means),
a statistical uniformity check of the random choice, and split invariance: the same mini-batch over
DP = 1, 2, 4 gloo ranks x 1, 2, 4 micro-batches gives the same loss, selected token set and summed gradient
with cov_scope=global (compared with `reference_loss` of tests/test_policy_loss.py on the whole batch),
while the micro-batch scope differs.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_cov_selection.py -q   (the two spawns take ~25 s)
"""
import pytest
import torch
import torch.distributed as dist

from dist import init_gloo, run_ranks
from megaent.algorithms import (
    loss_denominator, policy_loss, select_clip_cov, select_kl_cov, select_tokens, token_covariance, token_priority,
)
from megaent.config.schema import LossConfig
from test_policy_loss import reference_loss

M32 = 0xFFFFFFFF
S = 48
B = 16
EMPTY_ROWS = range(4, 8)  # rank 1 of 4 has no valid token at all; with DP=2 a whole micro-batch is empty


# ---------------------------------------------------------------- references (no megaent code)

def ref_mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_priority(seed, uid):
    return ref_mix32((uid & M32) ^ ref_mix32((uid >> 32) ^ ref_mix32(seed)))


def ref_seed(gen_seed):
    return int(torch.randint(1 << 31, (), generator=torch.Generator().manual_seed(gen_seed)))


def ref_cov(lp, adv, mask):
    """{uid: c_i} with c_i rounded to fp32 from float64 means over the valid tokens."""
    idx = mask.reshape(-1).nonzero().reshape(-1).tolist()
    a = adv.reshape(-1).double()[idx]
    v = lp.reshape(-1).double()[idx]
    c = ((a - a.mean()) * (v - v.mean())).float().tolist()
    return dict(zip(idx, c))


def ref_clip_cov(lp, old, adv, mask, cfg, gen_seed):
    cov = ref_cov(lp, adv, mask)
    r, a = torch.exp(lp - old).reshape(-1), adv.reshape(-1)
    clipped = {u for u in cov if (a[u] > 0 and r[u] > 1 + cfg.clip_ratio_high) or
               (a[u] < 0 and r[u] < 1 - cfg.clip_ratio_low)}
    cands = [u for u in cov if u not in clipped and cfg.clip_cov_lb < cov[u] < cfg.clip_cov_ub]
    k = max(1, int(cfg.clip_cov_ratio * len(cov)))
    seed = ref_seed(gen_seed)
    return set(sorted(cands, key=lambda u: (ref_priority(seed, u), u))[:k]), len(cands), k


def ref_kl_cov(lp, adv, mask, cfg):
    cov = ref_cov(lp, adv, mask)
    k = max(1, int(cfg.kl_cov_ratio * len(cov)))
    return set(sorted(cov, key=lambda u: (-cov[u], u))[:k])


def uid_set(sel, uid):
    return set(uid[sel].tolist())


def make_minibatch(seed=0):
    """[B, S] data whose covariances fall well inside (1, 5) for many tokens, some PPO-clipped, ragged rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[1] = 1  # a sequence with one valid token
    mask = torch.arange(S)[None, :] < lengths[:, None]
    mask[list(EMPTY_ROWS)] = False
    lp = -torch.rand(B, S, generator=g) * 5
    old = lp + 0.3 * torch.randn(B, S, generator=g)
    adv = (torch.randn(B, generator=g) * 2)[:, None].expand(B, S).clone()
    uid = torch.arange(B)[:, None] * S + torch.arange(S)[None, :]
    ent = torch.rand(B, S, generator=g)
    ref = lp + 0.2 * torch.randn(B, S, generator=g)
    return lp, old, adv, mask, uid, ent, ref


CONFIGS = {
    "clip_cov": dict(policy_loss="clip_cov", clip_cov_ratio=0.02),
    "kl_cov": dict(policy_loss="kl_cov", kl_cov_ratio=0.02),
    "ppo_dual_bonus": dict(dual_clip_c=2.0, clip_ratio_high=0.28, entropy_coef=0.01, kl_coef=0.1),
}
# (config, aggregation) pairs: each loss kind and each aggregation at least once, few cases per spawn
# (every case costs ~30 gloo all-reduces per rank on a 2-core machine).
CASES = (("clip_cov", "token_mean"), ("clip_cov", "seq_mean_token_mean"), ("kl_cov", "seq_mean_token_sum"),
         ("ppo_dual_bonus", "seq_mean_token_mean"))
GEN_SEED = 1234


# ---------------------------------------------------------------- single process

def test_priority_hash_matches_integer_reference():
    uid = torch.tensor([0, 1, 2, 12345, (1 << 32) + 7, (1 << 62) + 99, (1 << 63) - 1], dtype=torch.int64)
    for seed in (0, 1, 2**31 - 1):
        got = token_priority(uid, torch.tensor(seed)).tolist()
        assert got == [ref_priority(seed, u) for u in uid.tolist()]


def test_selection_matches_reference_single_process():
    lp, old, adv, mask, uid, _, _ = make_minibatch(seed=1)
    for cfg_kw in (dict(clip_cov_ratio=0.02), dict(clip_cov_ratio=0.01, clip_cov_lb=0.5, clip_cov_ub=2.0)):
        cfg = LossConfig(policy_loss="clip_cov", **cfg_kw)
        sel = select_tokens(lp, old, adv, mask, cfg, generator=torch.Generator().manual_seed(GEN_SEED),
                            token_uid=uid)
        want, n_cand, k = ref_clip_cov(lp, old, adv, mask, cfg, GEN_SEED)
        assert n_cand > 3 * k  # the choice is a real choice
        assert uid_set(sel, uid) == want and len(want) == k
    cfg = LossConfig(policy_loss="kl_cov", kl_cov_ratio=0.02)
    sel = select_tokens(lp, old, adv, mask, cfg, token_uid=uid)
    assert uid_set(sel, uid) == ref_kl_cov(lp, adv, mask, cfg)
    cov = token_covariance(lp, adv, mask)
    ref = ref_cov(lp, adv, mask)
    assert torch.equal(cov.reshape(-1)[list(ref)], torch.tensor(list(ref.values())))
    assert torch.all(cov[~mask] == 0)


def test_kl_cov_ties_break_by_uid_and_fewer_candidates_take_all():
    cov = torch.tensor([[1.0, 3.0, 3.0, 3.0, -2.0, 3.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    uid = torch.tensor([[10, 13, 11, 12, 14, 0]])
    sel = select_kl_cov(cov, mask, kl_cov_ratio=0.4, token_uid=uid)  # k = int(0.4 * 5) = 2 of three tied 3.0
    assert uid_set(sel, uid) == {11, 12}
    # Clip-Cov: two candidates in (1, 5), k = 1 of 5 -> one of them; with ratio 0.5 -> k = 2 -> both
    no_clip = torch.zeros_like(mask)
    cov2 = torch.tensor([[2.0, 0.5, 4.0, 6.0, 1.0, 3.0]])
    for ratio, n in ((0.2, 1), (0.5, 2), (0.9, 2)):
        s = select_clip_cov(cov2, mask, no_clip, clip_cov_ratio=ratio, clip_cov_lb=1.0, clip_cov_ub=5.0,
                            generator=torch.Generator().manual_seed(0), token_uid=uid)
        assert s.sum() == n and uid_set(s, uid) <= {10, 11}
    # empty candidate set (everything PPO-clipped): nothing selected
    s = select_clip_cov(cov2, mask, torch.ones_like(mask), clip_cov_ratio=0.5, clip_cov_lb=1.0, clip_cov_ub=5.0,
                        generator=torch.Generator().manual_seed(0), token_uid=uid)
    assert s.sum() == 0


def test_clip_cov_choice_is_uniform_over_candidates():
    """Over 4000 seeds each of 40 candidate uids is among the k smallest priorities k/40 of the time (binomial,
    5-sigma bound); the selection picks exactly those (test_selection_matches_reference_single_process)."""
    n, k, trials = 40, 4, 4000
    uid = torch.arange(n)[None] * 977 + (1 << 33)
    seeds = torch.stack([torch.randint(1 << 31, (), generator=torch.Generator().manual_seed(t)) for t in range(trials)])
    prio = token_priority(uid, seeds[:, None])  # [trials, n]
    picked = prio.topk(k, dim=1, largest=False).indices
    counts = torch.bincount(picked.reshape(-1), minlength=n).float()
    p = k / n
    sd = (trials * p * (1 - p)) ** 0.5
    assert torch.all((counts - trials * p).abs() < 5 * sd), counts
    # and one end-to-end draw through select_clip_cov picks the k smallest priorities
    mask = torch.ones(1, n, dtype=torch.bool)
    sel = select_clip_cov(torch.full((1, n), 2.0), mask, torch.zeros_like(mask), clip_cov_ratio=k / n,
                          clip_cov_lb=1.0, clip_cov_ub=5.0, generator=torch.Generator().manual_seed(7), token_uid=uid)
    assert set(sel[0].nonzero().reshape(-1).tolist()) == set(picked[7].tolist())


# ---------------------------------------------------------------- split invariance over ranks

def _run_split(lp, old, adv, mask, uid, ent, ref, cfg, mb, group, scope):
    """This rank's share of the mini-batch in `mb` micro-batches: (summed loss, grad, selected uids)."""
    x = lp.clone().requires_grad_()
    rows = torch.arange(lp.shape[0]).chunk(mb)
    den = loss_denominator([mask[r] for r in rows], cfg, group)
    gen = torch.Generator().manual_seed(GEN_SEED)
    sel_all = None
    if scope == "global":
        sel_all = select_tokens(lp, old, adv, mask, cfg, group, gen, token_uid=uid)
    total, picked = torch.zeros(()), set()
    for r in rows:
        kw = dict(entropy=ent[r], ref_logprobs=ref[r]) if cfg.entropy_coef else {}
        if scope == "global":
            loss, st = policy_loss(x[r], old[r], adv[r], mask[r], cfg, group, selected=None if sel_all is None
                                   else sel_all[r], denominator=den, **kw)
        else:
            gen = torch.Generator().manual_seed(GEN_SEED)
            sel = select_tokens(lp[r], old[r], adv[r], mask[r], cfg, None, gen, token_uid=uid[r])
            loss, st = policy_loss(x[r], old[r], adv[r], mask[r], cfg, None, selected=sel, denominator=den, **kw)
            if sel is not None:
                picked |= uid_set(sel, uid[r])
        total = total + loss
    total.backward()
    if sel_all is not None:
        picked = uid_set(sel_all, uid)
    return total.detach(), x.grad, picked


def _all_cases(rank, world, group):
    lp, old, adv, mask, uid, ent, ref = make_minibatch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    data = [t[rows] for t in (lp, old, adv, mask, uid, ent, ref)]
    out = {}
    for name, agg in CASES:
        cfg = LossConfig(loss_agg=agg, **CONFIGS[name])
        for mb in (1, 2, 4):
            for scope in ("global", "micro_batch") if cfg.policy_loss != "ppo" else ("global",):
                out[name, agg, mb, scope] = _run_split(*data, cfg, mb, group, scope)
    return out


def _rank_main(rank, world):
    init_gloo()
    return _all_cases(rank, world, dist.group.WORLD)


def _check_against_reference(results_per_rank, world):
    """Global scope == one-process reference; returns {case: micro-batch scope picked another set}."""
    lp, old, adv, mask, uid, ent, ref = make_minibatch()
    diffs = {}
    for name, agg in CASES:
        cfg = LossConfig(loss_agg=agg, **CONFIGS[name])
        want_sel = None
        if cfg.policy_loss == "clip_cov":
            want_sel, n_cand, k = ref_clip_cov(lp, old, adv, mask, cfg, GEN_SEED)
            assert n_cand > 3 * k >= 3  # a real random choice among many candidates
        elif cfg.policy_loss == "kl_cov":
            want_sel = ref_kl_cov(lp, adv, mask, cfg)
        sel_mask = torch.zeros(B * S, dtype=torch.bool)
        if want_sel:
            sel_mask[list(want_sel)] = True
        x = lp.clone().double().requires_grad_()
        bonus = (ent, ref) if cfg.entropy_coef else (None, None)
        want = reference_loss(x, old, adv, mask, cfg, sel_mask.view(B, S), *bonus)
        want.backward()
        for mb in (1, 2, 4):
            for scope in ("global", "micro_batch") if want_sel is not None else ("global",):
                res = [r[name, agg, mb, scope] for r in results_per_rank]
                loss = sum(r[0] for r in res)
                grad = torch.cat([r[1] for r in res])
                picked = set().union(*[r[2] for r in res])
                if scope == "global":
                    # fp32 sums in another order than the fp64 reference: 1e-5 relative
                    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6), (name, agg, mb)
                    torch.testing.assert_close(grad, x.grad.float(), rtol=1e-5, atol=1e-7)
                    if want_sel is not None:
                        assert picked == want_sel, (name, agg, mb)
                elif world * mb > 1:
                    diffs[name, agg, mb] = picked != want_sel
    return diffs


def _check_world(world):
    if world == 1:
        results = [_all_cases(0, 1, None)]
    else:
        results = run_ranks(_rank_main, world)
    diffs = _check_against_reference(results, world)
    # the older per-micro-batch scope picks other tokens than the mini-batch selection
    assert diffs and all(diffs.values()), diffs


def test_split_invariance_dp1():
    _check_world(1)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_split_invariance_over_ranks(world):
    _check_world(world)
