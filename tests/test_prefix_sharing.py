"""Prefix-shared training micro-batches (a GRPO group's prompt forwarded once) against the unshared layout.

References:
- layout: `pack(share_prefix=False)`, today's one-segment-per-sample layout; every per-response value read back
  with `unpack_response` (inputs, targets, positions, mask, advantages, old log-probs, token uids) must be equal,
  the prefix segments are checked against the prompts they come from, and the token count against
  (p - 1) + sum(response lengths) per shared group;
- attention: `SegmentLayout` with `prefix_ids` vs SDPA with the dense [S, S] mask of `build_attention_mask`
  (the definition: same segment and causal, or the key's segment is the query's prefix), outputs and q/k/v
  gradients in fp64, two rows whose segment ids repeat across rows;
- update: the full megaent update (`compute_logprobs`, `train_mini_batch`, KL-Cov and on-policy PPO) on a tiny
  random HF Qwen2 with `make_micro_batches(share_prefix=True)` vs `share_prefix=False`: per-response log-probs,
  loss and every parameter gradient (rtol 1e-4 / atol 1e-6), one process and on 2 gloo ranks (TP=2, PP=2).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_prefix_sharing.py   (about 30 s)
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dist import run_ranks
from harness import KeepGrads, attention_with_grads
from megaent.model.layers import SegmentLayout, _segment_attention, build_attention_mask
from megaent.trainer.batching import UID_STRIDE, TrainSample, make_micro_batches, pack, share_units, unpack_response

VOCAB = 1001
# (group id, prompt_len, response lengths): uneven responses, prompt lengths 1..8, group 3 twice with different
# prompts (never shared), a lone sample, and group 5 (7 + 5 * 10 = 57 row tokens) over the 40-token budget.
SPEC = [(0, 6, [5, 9, 3, 7]), (1, 4, [8, 8, 2]), (3, 5, [4, 6]), (3, 5, [6, 3]), (4, 1, [5, 4]), (2, 3, [9]),
        (5, 8, [10, 10, 10, 10, 10])]


def make_samples(spec=SPEC, seed=0, with_old=True) -> list[TrainSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for group, p, resps in spec:
        prompt = torch.randint(4, VOCAB, (p,), generator=g)
        for r in resps:
            tokens = torch.cat([prompt, torch.randint(4, VOCAB, (r,), generator=g)])
            out.append(TrainSample(tokens=tokens, prompt_len=p, advantage=float(torch.randn(1, generator=g)),
                                   old_logprobs=-torch.rand(r, generator=g) - 1.0 if with_old else None,
                                   group=group, uid=len(out) + 100))
    return out


def _row_tokens(samples) -> int:
    """Expected row tokens: each shared group (>= 2 samples, p >= 2, same prompt) (p-1) + responses, else L."""
    total = 0
    for unit in share_units(samples):
        ss = [samples[i] for i in unit]
        total += len(ss[0]) if len(ss) == 1 else ss[0].prompt_len - 1 + sum(s.response_len for s in ss)
    return total


def test_shared_layout_matches_unshared():
    ss = make_samples()
    units = share_units(ss)
    assert sorted(len(u) for u in units if len(u) > 1) == [2, 2, 3, 4, 5]  # group 3: two units, p=1: none
    ref, mb = pack(ss, share_prefix=False), pack(ss)
    assert ref.prefix_ids is None and ref.num_tokens == sum(len(s) for s in ss)
    assert mb.num_tokens == _row_tokens(ss) < ref.num_tokens
    saved = sum((len(u) - 1) * (ss[u[0]].prompt_len - 1) + len(u) for u in units if len(u) > 1)
    assert ref.num_tokens - mb.num_tokens == saved
    for name in ("input_ids", "targets", "position_ids", "mask", "advantages", "old_logprobs", "token_uid"):
        a, b = unpack_response(getattr(ref, name), ref), unpack_response(getattr(mb, name), mb)
        assert set(a) == set(b) == {s.uid for s in ss}
        for uid in a:
            assert torch.equal(a[uid], b[uid]), (name, uid)
    assert float(mb.mask.sum()) == float(ref.mask.sum()) == sum(s.response_len for s in ss)
    assert len(set(mb.token_uid[0].tolist())) == mb.num_tokens
    # prefix segments: prompt[:p-1], mask 0, targets 0, token uids of the unit's first sample
    seg, pre = mb.segment_ids[0], mb.prefix_ids[0]
    by_uid = {s.uid: s for s in ss}
    for pid in sorted(set(pre.tolist()) - {-1}):
        where = (seg == pid).nonzero()[:, 0]
        readers = sorted({int(mb.token_uid[0, j]) // UID_STRIDE for j in (pre == pid).nonzero()[:, 0]})
        first = by_uid[readers[0]]
        assert torch.equal(mb.input_ids[0, where], first.tokens[:first.prompt_len - 1])
        assert torch.equal(mb.position_ids[0, where], torch.arange(first.prompt_len - 1))
        assert mb.mask[0, where].sum() == 0 and mb.targets[0, where].abs().sum() == 0
        assert torch.equal(mb.token_uid[0, where], first.uid * UID_STRIDE + torch.arange(first.prompt_len - 1))
        for uid in readers:
            assert torch.equal(by_uid[uid].tokens[:by_uid[uid].prompt_len - 1], first.tokens[:first.prompt_len - 1])
            assert by_uid[uid].group == first.group
        assert int(where.max()) < int((pre == pid).nonzero().min())  # the prefix precedes its readers
    assert torch.all(mb.mask[0][pre >= 0] == 1)  # sample segments: every position predicts a response token


@pytest.mark.parametrize("budget", [40, 23, 1000])
def test_micro_batches_keep_groups_and_budget(budget):
    ss = make_samples()
    mbs = make_micro_batches(ss, max_tokens=budget)
    seen = [uid for mb in mbs for uid in mb.uids]
    assert sorted(seen) == sorted(s.uid for s in ss)
    by_uid = {s.uid: s for s in ss}
    for mb in mbs:
        assert mb.num_tokens <= budget or len(mb.uids) == 1
        assert mb.num_tokens == _row_tokens([by_uid[u] for u in mb.uids])
    for unit in share_units(ss):
        ss_u = [ss[i] for i in unit]
        holders = {k for k, mb in enumerate(mbs) for u in mb.uids if u in {s.uid for s in ss_u}}
        if _row_tokens(ss_u) <= budget:
            assert len(holders) == 1  # a group that fits stays in one micro-batch
        elif len(unit) > 1:
            assert len(holders) > 1
    ref = make_micro_batches(ss, max_tokens=budget, share_prefix=False)
    assert sum(mb.num_tokens for mb in ref) == sum(len(s) for s in ss)
    if budget == 40:  # group 5 is split: each piece carries its own prefix
        g5 = [mb for mb in mbs if any(by_uid[u].group == 5 for u in mb.uids)]
        assert len(g5) == 2 and all(mb.prefix_ids is not None for mb in g5)


def _dense_attention(q, k, v, mask, gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(q.shape[-1]),
                                          enable_gqa=gqa).transpose(1, 2)


@pytest.mark.parametrize("nq,nkv", [(4, 2), (2, 2)])
def test_segment_layout_with_prefix_matches_dense_mask(nq, nkv):
    rows = [pack(make_samples(SPEC[:4], seed=1)), pack(make_samples(SPEC[4:], seed=2))]
    s = max(mb.num_tokens for mb in rows) + 3

    def padded(t, fill):  # [1, S_mb] -> [S]; a tail segment of junk (id 99) pads the shorter row
        return torch.cat([t[0], torch.full((s - t.shape[1],), fill, dtype=t.dtype)])

    seg = torch.stack([padded(mb.segment_ids, 99) for mb in rows])  # ids 0.. repeat in both rows
    pre = torch.stack([padded(mb.prefix_ids, -1) for mb in rows])
    assert (pre >= 0).any(1).all()
    g = torch.Generator().manual_seed(0)
    b, d = 2, 8
    q0, k0, v0 = (torch.randn(b, n, s, d, generator=g, dtype=torch.float64) for n in (nq, nkv, nkv))
    w = torch.randn(b, s, nq, d, generator=g, dtype=torch.float64)
    layout = build_attention_mask(q_len=s, cache_len=0, key_mask=None, segment_ids=seg, batch=b, device=seg.device,
                                  prefix_ids=pre)
    assert isinstance(layout, SegmentLayout) and layout.dup_slot is not None
    dense = build_attention_mask(q_len=s, cache_len=0, key_mask=torch.ones(b, s, dtype=torch.bool),
                                 segment_ids=seg, batch=b, device=seg.device, prefix_ids=pre)
    assert dense.shape == (b, 1, s, s)
    got = attention_with_grads(lambda q, k, v: _segment_attention(q, k, v, layout, scale=1 / math.sqrt(d),
                                                                  gqa=nq != nkv), q0, k0, v0, w)
    ref = attention_with_grads(lambda q, k, v: _dense_attention(q, k, v, dense, nq != nkv), q0, k0, v0, w)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match="prefix_ids"):
        SegmentLayout.from_segment_ids(seg, torch.where(pre >= 0, 77, -1))


def _updates(policy, st, samples, *, share: bool, max_tokens: int) -> dict:
    """Log-probs, KL-Cov update (old log-probs off-policy) and on-policy PPO update with one layout."""
    from megaent.config.schema import LossConfig
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    out = {}
    mbs = make_micro_batches(samples, max_tokens=max_tokens, dp_group=st.dp_group, share_prefix=share)
    out["tokens"] = sum(mb.num_tokens for mb in mbs)
    out["lp"] = {u: v[0].clone() for u, v in compute_logprobs(policy, mbs, state=st).items()}
    opt = KeepGrads(policy, missing_as_zero=True)
    cfg = LossConfig(policy_loss="kl_cov", kl_cov_ratio=0.05)
    stats = train_mini_batch(policy, opt, mbs, loss_cfg=cfg, state=st, generator=torch.Generator().manual_seed(1))
    out["kl_cov"] = (stats["actor/loss"], opt.grads)
    on = [TrainSample(tokens=s.tokens, prompt_len=s.prompt_len, advantage=s.advantage, group=s.group, uid=s.uid)
          for s in samples]
    mbs = make_micro_batches(on, max_tokens=max_tokens, dp_group=st.dp_group, share_prefix=share)
    stats = train_mini_batch(policy, opt, mbs, loss_cfg=LossConfig(policy_loss="ppo"), state=st,
                             old_from_current=True)
    out["ppo"] = (stats["actor/loss"], opt.grads)
    return out


def _compare(a: dict, b: dict) -> dict:
    """Max errors of b against a (reference): log-probs, losses, gradients (relative to rtol 1e-4 + atol 1e-6)."""
    err = {"lp": max(float((a["lp"][u] - b["lp"][u]).abs().max()) for u in a["lp"])}
    for key in ("kl_cov", "ppo"):
        (la, ga), (lb, gb) = a[key], b[key]
        err[f"{key}_loss"] = abs(la - lb) / max(abs(la), 1e-12)
        err[f"{key}_grad"] = max(float(((x - y).abs() / (1e-6 + 1e-4 * y.abs())).max()) for x, y in zip(gb, ga))
        err[f"{key}_grad_nonzero"] = sum(float(y.abs().sum()) for y in ga)
    return err


def _check(err: dict) -> None:
    assert err["lp"] < 1e-5, err
    for key in ("kl_cov", "ppo"):
        assert err[f"{key}_loss"] < 1e-5, err
        assert err[f"{key}_grad"] <= 1.0, err  # |shared - unshared| <= 1e-6 + 1e-4 |unshared|, every element
        assert err[f"{key}_grad_nonzero"] > 0, err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_tiny import make_tiny_hf

    return str(make_tiny_hf(tmp_path_factory.mktemp("hf"), family="qwen2", hidden=64, layers=2, heads=4,
                            kv_heads=2, vocab_size=VOCAB, weight_std=0.05, seed=3))


def test_update_shared_equals_unshared_one_process(hf_dir):
    from megaent.model import load_hf
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.parallel.launch import free_port

    ss = make_samples()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        st = init_parallel(1, 1)
        policy = load_hf(hf_dir, st)
        ref = _updates(policy, st, ss, share=False, max_tokens=40)
        got = _updates(policy, st, ss, share=True, max_tokens=40)
    finally:
        destroy_parallel()
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
    assert got["tokens"] == _row_tokens_split(ss, 40) < ref["tokens"] == sum(len(s) for s in ss)
    _check(_compare(ref, got))


def _row_tokens_split(ss, budget) -> int:
    """Row tokens of all micro-batches of make_micro_batches(share_prefix=True) with this budget."""
    return sum(mb.num_tokens for mb in make_micro_batches(ss, max_tokens=budget))


def _two_ranks(rank, world, hf_dir):
    from megaent.model import load_hf
    from megaent.parallel import init_parallel

    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        st = init_parallel(tp, pp)
        policy = load_hf(hf_dir, st)
        ss = make_samples(seed=4)
        out[(tp, pp)] = _compare(_updates(policy, st, ss, share=False, max_tokens=40),
                                 _updates(policy, st, ss, share=True, max_tokens=40))
    return out


@pytest.mark.slow
def test_update_shared_equals_unshared_tp2_pp2(hf_dir):
    for rank_out in run_ranks(_two_ranks, 2, hf_dir):
        for layout, err in rank_out.items():
            _check(err)
