"""fused_head_logprobs_entropy vs the materialised reference (hidden @ W.T, log_softmax, float64).

Compares log p(target), entropy and the gradients w.r.t. hidden and the weight shard at TP=1
(in process) and TP=2 / TP=4 (one spawn of 4 gloo ranks: TP=4, then TP=2 x DP=2, every case),
vocab 1001 (LM-head rows padded per rank with large garbage that must be masked by
`vocab_size`) and 32000, fp32 and bf16, temperature != 1, chunk sizes that do and do not
divide the shard; float64 gradcheck of both outputs; `entropy_grad=False` raises on an
entropy backward; saved-tensor hooks prove only per-token scalars are kept for backward.

Tolerances: fp32 values 1e-5 absolute, gradients max|diff| <= 1e-5 * max|ref|. bf16: the op
computes logits with a bf16 matmul (as the model does), each logit rounded with unit
roundoff 2^-9, so |d logp|, |d H| <= ~2 max|d logit| <= 4 * 2^-9 * max|logit|; the
gradients inherit that perturbation of p plus bf16 products: max|diff| <= 2^-5 * max|ref|.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_ops_fused_head.py
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist import run_ranks
from megaent.ops import fused_head_logprobs_entropy

CASES = [  # name, V, leading shape, H, dtype, temperature, chunk_size, pass vocab_size, outputs with a gradient
    dict(name="v1001_fp32_chunk64", v=1001, lead=(7,), h=16, dtype=torch.float32, temp=1.0, chunk=64,
         grads="both"),
    dict(name="v1001_fp32_t07_chunk100_bt", v=1001, lead=(2, 4), h=16, dtype=torch.float32, temp=0.7, chunk=100,
         grads="both"),
    dict(name="v1001_bf16_t13", v=1001, lead=(7,), h=16, dtype=torch.bfloat16, temp=1.3, chunk=128,
         grads="both"),
    dict(name="v1001_fp32_no_entropy_grad", v=1001, lead=(7,), h=16, dtype=torch.float32, temp=0.7, chunk=64,
         grads="logp", entropy_grad=False),
    dict(name="v32000_fp32_t07", v=32000, lead=(6,), h=8, dtype=torch.float32, temp=0.7, chunk=4096,
         grads="both"),
    dict(name="v32000_fp32_entropy_only_default_vocab", v=32000, lead=(6,), h=8, dtype=torch.float32, temp=1.0,
         chunk=3000, grads="entropy", no_vocab_size=True),
    dict(name="v32000_bf16", v=32000, lead=(6,), h=8, dtype=torch.bfloat16, temp=1.0, chunk=4096, grads="both"),
]
IDS = [c["name"] for c in CASES]


def make_case(i: int):
    c = CASES[i]
    g = torch.Generator().manual_seed(2000 + i)
    hidden = torch.randn(*c["lead"], c["h"], generator=g)
    weight = torch.randn(c["v"], c["h"], generator=g) * 0.5
    garbage = torch.randn(8, c["h"], generator=g) * 50.0  # padded rows: huge logits unless masked
    targets = torch.randint(0, c["v"], c["lead"], generator=g)
    w_lp, w_ent = torch.randn(c["lead"], generator=g), torch.randn(c["lead"], generator=g)
    return hidden.to(c["dtype"]), weight.to(c["dtype"]), garbage.to(c["dtype"]), targets, w_lp, w_ent


def loss_of(c, logp, ent, w_lp, w_ent):
    loss = 0.0
    if c["grads"] in ("both", "logp"):
        loss = loss + (logp * w_lp).sum()
    if c["grads"] in ("both", "entropy"):
        loss = loss + (ent * w_ent).sum()
    return loss


def run_op(c, hidden, w_shard, targets, w_lp, w_ent, group=None):
    h = hidden.clone().requires_grad_()
    w = w_shard.clone().requires_grad_()
    logp, ent = fused_head_logprobs_entropy(h, w, targets, group, chunk_size=c["chunk"], temperature=c["temp"],
                                            vocab_size=None if c.get("no_vocab_size") else c["v"],
                                            entropy_grad=c.get("entropy_grad", True))
    loss_of(c, logp, ent, w_lp, w_ent).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def check(i: int, logp, ent, grad_h, grad_w_padded):
    """grad_w_padded: the ranks' weight grads concatenated, [tp * Vl, H]."""
    c = CASES[i]
    hidden, weight, _, targets, w_lp, w_ent = make_case(i)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    r_lp, r_ent = ref.head_logprobs_entropy(h, w, targets, c["temp"])
    loss_of(c, r_lp, r_ent, w_lp.double(), w_ent.double()).backward()
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    if c["dtype"] == torch.float32:
        val_tol, grad_rel = 1e-5, 1e-5
    else:
        val_tol, grad_rel = 4 * 2.0**-9 * float((h @ w.t() / c["temp"]).abs().max().detach()), 2.0**-5
    torch.testing.assert_close(logp.double(), r_lp.detach(), atol=val_tol, rtol=0)
    torch.testing.assert_close(ent.double(), r_ent.detach(), atol=val_tol, rtol=0)
    assert grad_h.dtype == c["dtype"] and grad_w_padded.dtype == c["dtype"]
    assert torch.all(grad_w_padded[c["v"]:] == 0), "padded LM-head rows must get zero gradient"
    for got, want in ((grad_h, h.grad), (grad_w_padded[:c["v"]], w.grad)):
        assert (got.double() - want).abs().max() <= grad_rel * want.abs().max()


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_tp1_matches_reference(i):
    c = CASES[i]
    hidden, weight, garbage, targets, w_lp, w_ent = make_case(i)
    w_shard = weight if c.get("no_vocab_size") else torch.cat([weight, garbage[:5]])  # 5 padded rows
    check(i, *run_op(c, hidden, w_shard, targets, w_lp, w_ent))


def tp_group(tp: int):
    """(group, rank in group) for contiguous TP groups of size tp over the default gloo group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]  # every rank creates all
    return groups[rank // tp], rank % tp


def _tp_worker(rank, world):
    from dist import init_gloo

    init_gloo()  # plain groups, no megatron-core: the op can only use its group= argument
    out = {}
    for tp in (4, 2):
        group, tp_rank = tp_group(tp)
        for i, c in enumerate(CASES):
            hidden, weight, garbage, targets, w_lp, w_ent = make_case(i)
            w_shard = ref.shard_rows(weight, tp, tp_rank, garbage)
            out[(tp, i)] = (tp_rank, run_op(c, hidden, w_shard, targets, w_lp, w_ent, group))
    out["megatron_imported"] = any(m.startswith("megatron") for m in sys.modules)
    dist.destroy_process_group()  # else dist.py's cleanup imports megatron-core just to tear down (~40 s)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tp_worker, 4)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_tp_matches_reference(tp_results, tp, i):
    shards = {}
    first = tp_results[0][(tp, i)][1]
    for res in tp_results:
        tp_rank, (logp, ent, grad_h, grad_w) = res[(tp, i)]
        assert torch.equal(logp, first[0]) and torch.equal(ent, first[1]), "ranks disagree on the values"
        assert torch.equal(grad_h, first[2]), "grad_hidden must be complete (all-reduced) on every rank"
        shards.setdefault(tp_rank, grad_w)
    check(i, first[0], first[1], first[2], torch.cat([shards[r] for r in range(tp)]))


@pytest.mark.slow
def test_no_megatron_globals(tp_results):
    assert not any(r["megatron_imported"] for r in tp_results)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=g)

    def f(h, w):
        return fused_head_logprobs_entropy(h, w, targets, chunk_size=3, temperature=0.8, vocab_size=9)

    assert torch.autograd.gradcheck(f, (h, w))
    torch.testing.assert_close(f(h, w), ref.head_logprobs_entropy(h, w[:9], targets, 0.8), atol=1e-12, rtol=0)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_saves_only_per_token_scalars(entropy_grad):
    t, hdim, v = 6, 8, 300
    h = torch.randn(t, hdim, requires_grad=True)
    w = torch.randn(v, hdim, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fused_head_logprobs_entropy(h, w, torch.randint(0, v, (t,)), chunk_size=64, entropy_grad=entropy_grad)
    assert sorted(saved) == sorted([(t, hdim), (v, hdim), (t,), (t,)] + [(t,)] * entropy_grad)


def test_entropy_grad_false_raises_on_entropy_backward():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    logp, ent = fused_head_logprobs_entropy(h, w, torch.randint(0, 50, (4,)), entropy_grad=False)
    with pytest.raises(RuntimeError, match="entropy_grad=False"):
        (logp.sum() + 0.01 * ent.sum()).backward()


def test_bad_inputs_name_the_problem():
    h, w, y = torch.randn(4, 8), torch.randn(50, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size=0"):
        fused_head_logprobs_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size=51"):
        fused_head_logprobs_entropy(h, w, y, vocab_size=51)
    with pytest.raises(ValueError, match="weight must be"):
        fused_head_logprobs_entropy(h, torch.randn(50, 7), y)
