"""Policy losses (PPO, clip-higher, dual-clip, Clip-Cov, KL-Cov, entropy bonus, KL to reference) against a
plain single-process reference written here (explicit per-row loops, float64 for the aggregation), values
and gradients w.r.t. log-probs; named closed-form cases (which tokens get zero gradient); edge cases.
Multi-rank / micro-batch invariance lives in tests/test_cov_selection.py (it reuses `reference_loss`).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_policy_loss.py -q
"""
import math

import pytest
import torch

from megaent.algorithms import loss_denominator, policy_loss
from megaent.config.schema import LossConfig

AGGS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def reference_token_loss(lp, old, adv, cfg, selected):
    """Per-token loss written from the papers' objectives (objective = -loss): min/max form, not megaent's."""
    r = torch.exp(lp - old)
    if cfg.policy_loss == "kl_cov":
        return -(r * adv - cfg.kl_cov_coef * torch.abs(lp - old) * selected)
    obj = torch.min(r * adv, torch.clamp(r, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high) * adv)
    if cfg.dual_clip_c is not None:
        obj = torch.where(adv < 0, torch.max(obj, cfg.dual_clip_c * adv), obj)
    if cfg.policy_loss == "clip_cov":
        obj = obj * (~selected)
    return -obj


def reference_loss(lp, old, adv, mask, cfg, selected=None, entropy=None, ref=None):
    """Loss of one whole batch (single process): per-row loops, no shared code with megaent."""
    lp, old, adv = lp.double(), old.double(), adv.double()
    tok = reference_token_loss(lp, old, adv, cfg, selected)
    if entropy is not None:
        tok = tok - cfg.entropy_coef * entropy.double()
    if ref is not None:
        d = ref.double() - lp
        tok = tok + cfg.kl_coef * ((torch.exp(d) - d - 1) if cfg.kl_estimator == "k3" else -d)
    rows = []
    for i in range(lp.shape[0]):
        v = tok[i][mask[i]]
        if v.numel():
            rows.append(v)
    if not rows:
        return lp.sum() * 0.0
    if cfg.loss_agg == "token_mean":
        return torch.cat(rows).mean()
    if cfg.loss_agg == "seq_mean_token_sum":
        return torch.stack([r.sum() for r in rows]).mean()
    return torch.stack([r.mean() for r in rows]).mean()


def make_batch(seed=0, B=6, S=10):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    mask = torch.arange(S)[None, :] < lengths[:, None]
    lp = -torch.rand(B, S, generator=g) * 3
    old = lp + 0.4 * torch.randn(B, S, generator=g)
    adv = (torch.randn(B, generator=g) * 1.5)[:, None].expand(B, S).clone()
    ent = torch.rand(B, S, generator=g) * 2
    ref = lp + 0.3 * torch.randn(B, S, generator=g)
    return lp, old, adv, mask, ent, ref


def _run(cfg, lp, old, adv, mask, selected=None, entropy=None, ref=None):
    x = lp.clone().requires_grad_()
    e = entropy.clone().requires_grad_() if entropy is not None else None
    loss, stats = policy_loss(x, old, adv, mask, cfg, selected=selected, entropy=e, ref_logprobs=ref,
                              generator=torch.Generator().manual_seed(0))
    loss.backward()
    return loss, stats, x.grad, (e.grad if e is not None else None)


def _ref(cfg, lp, old, adv, mask, selected=None, entropy=None, ref=None):
    x = lp.clone().double().requires_grad_()
    e = entropy.clone().double().requires_grad_() if entropy is not None else None
    loss = reference_loss(x, old, adv, mask, cfg, selected, e, ref)
    loss.backward()
    return loss, x.grad, (e.grad if e is not None else None)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kind", ["ppo", "ppo_dual_higher", "clip_cov", "kl_cov", "ppo_bonus_k1", "ppo_bonus_k3"])
def test_loss_and_grad_match_reference(kind, agg):
    lp, old, adv, mask, ent, ref = make_batch(seed=len(kind) + len(agg))
    selected = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) < 0.3) & mask
    cfg = LossConfig(loss_agg=agg)
    entropy = ref_lp = None
    sel = None
    if kind == "ppo_dual_higher":
        cfg = LossConfig(loss_agg=agg, clip_ratio_high=0.28, dual_clip_c=1.5)
    elif kind in ("clip_cov", "kl_cov"):
        cfg = LossConfig(loss_agg=agg, policy_loss=kind, kl_cov_coef=0.7)
        sel = selected
    elif kind.startswith("ppo_bonus"):
        cfg = LossConfig(loss_agg=agg, entropy_coef=0.05, kl_coef=0.2, kl_estimator=kind[-2:])
        entropy, ref_lp = ent, ref
    loss, stats, grad, egrad = _run(cfg, lp, old, adv, mask, sel, entropy, ref_lp)
    rloss, rgrad, regrad = _ref(cfg, lp, old, adv, mask, sel, entropy, ref_lp)
    # fp32 loss vs fp64 reference: relative 1e-6-ish error on O(1) values.
    assert loss.item() == pytest.approx(rloss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, rgrad.float(), rtol=1e-5, atol=1e-7)
    if egrad is not None:
        torch.testing.assert_close(egrad, regrad.float(), rtol=1e-5, atol=1e-7)
    assert torch.all(grad[~mask] == 0)
    # stats against direct masked means
    r = torch.exp(lp - old)[mask]
    a = adv[mask]
    clipfrac = ((a > 0) & (r > 1 + cfg.clip_ratio_high)) | ((a < 0) & (r < 1 - cfg.clip_ratio_low))
    if cfg.dual_clip_c is not None:
        clipfrac = clipfrac | ((a < 0) & (r > cfg.dual_clip_c))
    assert stats["pg_clipfrac"].item() == pytest.approx(clipfrac.float().mean().item(), abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx((old - lp)[mask].mean().item(), rel=1e-5, abs=1e-7)
    if sel is not None:
        assert stats["selected_frac"].item() == pytest.approx(sel[mask].float().mean().item(), abs=1e-6)
    if entropy is not None:
        assert stats["entropy_mean"].item() == pytest.approx(ent[mask].mean().item(), rel=1e-5)
    v = lp[mask].double()
    c = (a.double() - a.double().mean()) * (v - v.mean())
    assert stats["cov_mean"].item() == pytest.approx(c.mean().item(), rel=1e-4, abs=1e-6)
    assert stats["cov_top_0.02pct"].item() == pytest.approx(c.max().item(), rel=1e-5)  # N < 5000: top-1


def _one_token(lp, old, a, cfg):
    """Loss and d loss / d logp of a single valid token."""
    x = torch.tensor([[lp]], requires_grad=True)
    loss, _ = policy_loss(x, torch.tensor([[old]]), torch.tensor([[a]]), torch.ones(1, 1, dtype=torch.bool), cfg,
                          selected=torch.ones(1, 1, dtype=torch.bool) if cfg.policy_loss != "ppo" else None)
    loss.backward()
    return loss.item(), x.grad.item()


def test_closed_form_cases():
    cfg = LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28)
    up = math.log(1.5)  # ratio 1.5 > 1 + 0.28
    # ratio above 1 + eps_high with A > 0: clipped -> loss -A (1 + eps_high), zero gradient.
    loss, g = _one_token(up, 0.0, 2.0, cfg)
    assert loss == pytest.approx(-2.0 * 1.28) and g == 0.0
    # ratio below 1 - eps_low with A < 0: clipped -> zero gradient.
    loss, g = _one_token(math.log(0.5), 0.0, -1.0, cfg)
    assert loss == pytest.approx(0.8) and g == 0.0
    # ratio above 1 + eps_high with A < 0: not clipped, gradient -A * ratio.
    loss, g = _one_token(up, 0.0, -1.0, cfg)
    assert loss == pytest.approx(1.5) and g == pytest.approx(1.5)
    # inside the trust region: loss -A r, gradient -A r.
    loss, g = _one_token(math.log(1.1), 0.0, 3.0, cfg)
    assert loss == pytest.approx(-3.3) and g == pytest.approx(-3.3)
    # dual-clip: A < 0 and ratio > c -> loss -A c, zero gradient; below c unchanged.
    dual = LossConfig(dual_clip_c=3.0)
    loss, g = _one_token(math.log(4.0), 0.0, -1.0, dual)
    assert loss == pytest.approx(3.0) and g == 0.0
    loss, g = _one_token(math.log(2.0), 0.0, -1.0, dual)
    assert loss == pytest.approx(2.0) and g == pytest.approx(2.0)
    # Clip-Cov-selected token: loss 0 and zero gradient (stop-gradient), though unclipped by PPO.
    loss, g = _one_token(math.log(1.1), 0.0, 3.0, LossConfig(policy_loss="clip_cov"))
    assert loss == 0.0 and g == 0.0
    # KL-Cov-selected token: -A r + beta |logp - logp_old|, no clipping even far outside the trust region.
    loss, g = _one_token(up, 0.0, 2.0, LossConfig(policy_loss="kl_cov", kl_cov_coef=1.0))
    assert loss == pytest.approx(-3.0 + up) and g == pytest.approx(-3.0 + 1.0)


def test_clip_cov_selected_tokens_have_zero_gradient_only_there():
    lp, old, adv, mask, _, _ = make_batch(seed=3)
    old = lp.clone()  # on-policy: no PPO clipping, every valid token has a non-zero gradient unless selected
    sel = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(9)) < 0.3) & mask
    cfg = LossConfig(policy_loss="clip_cov")
    loss, _, grad, _ = _run(cfg, lp, old, adv, mask, sel)
    assert torch.all(grad[sel] == 0)
    assert torch.all(grad[mask & ~sel & (adv != 0)] != 0)
    # ... and the selected tokens still count in the token-mean denominator
    _, _, grad_ppo, _ = _run(LossConfig(), lp, old, adv, mask)
    torch.testing.assert_close(grad[mask & ~sel], grad_ppo[mask & ~sel])


def test_microbatch_shares_sum_to_full_batch():
    lp, old, adv, mask, ent, ref = make_batch(seed=4, B=8)
    for agg in AGGS:
        cfg = LossConfig(loss_agg=agg, entropy_coef=0.01, kl_coef=0.1)
        full, _, gfull, _ = _run(cfg, lp, old, adv, mask, entropy=ent, ref=ref)
        den = loss_denominator([mask[:3], mask[3:]], cfg)
        x = lp.clone().requires_grad_()
        total = sum(policy_loss(x[s], old[s], adv[s], mask[s], cfg, denominator=den, entropy=ent[s],
                                ref_logprobs=ref[s])[0] for s in (slice(0, 3), slice(3, 8)))
        total.backward()
        assert total.item() == pytest.approx(full.item(), rel=1e-6)
        torch.testing.assert_close(x.grad, gfull)


def test_edge_cases_are_finite():
    lp, old, adv, mask, _, _ = make_batch(seed=6)
    gen = torch.Generator().manual_seed(0)
    for kind in ("ppo", "clip_cov", "kl_cov"):
        cfg = LossConfig(policy_loss=kind)
        # all-zero advantages: loss 0 for ppo/clip_cov; kl_cov keeps only its penalty on k tokens
        x = lp.clone().requires_grad_()
        loss, st = policy_loss(x, old, torch.zeros_like(adv), mask, cfg, generator=gen)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and st["cov_mean"] == 0
        if kind == "clip_cov":
            assert st["selected_frac"] == 0  # c = 0 is never inside (lb, ub) = (1, 5)
        if kind == "kl_cov":
            assert st["selected_frac"] * mask.sum() == 1  # k = max(1, int(2e-3 N)) = 1
        # fully masked batch with garbage (inf, nan) in the padding: loss 0, zero gradient, zero stats
        x = torch.full_like(lp, -float("inf")).requires_grad_()
        none = torch.zeros_like(mask)
        loss, st = policy_loss(x, torch.full_like(old, float("nan")), adv, none, cfg, generator=gen)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(x.grad == 0)
        assert all(torch.isfinite(v) and v == 0 for v in st.values())
        # a group (row) with a single valid token, inf garbage elsewhere
        one = torch.zeros_like(mask)
        one[0, 0] = True
        x = torch.where(one, lp, torch.tensor(float("inf"))).requires_grad_()
        loss, st = policy_loss(x, old, adv, one, cfg, generator=gen)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and st["cov_mean"] == 0


def test_errors_name_the_key():
    lp, old, adv, mask, _, _ = make_batch()
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(lp, old, adv, mask, LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="kl_coef"):
        policy_loss(lp, old, adv, mask, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="generator"):
        policy_loss(lp, old, adv, mask, LossConfig(policy_loss="clip_cov"))
    with pytest.raises(ValueError, match="policy_loss"):
        policy_loss(lp, old, adv, mask, LossConfig(policy_loss="gspo"))
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(lp, old, adv, mask, LossConfig(loss_agg="mean"))
