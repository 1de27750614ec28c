"""vocab_parallel_logprobs_entropy vs the single-process reference (full logits, log_softmax, float64).

Compares log p(target), entropy and the gradient w.r.t. the logits shard at TP=1 (in process)
and TP=2 / TP=4 (one spawn of 4 gloo ranks running every case: TP=4, then TP=2 x DP=2), for
vocab 1001 (padded per rank with -inf or finfo.min columns) and 32000, fp32 and bf16, and
temperatures != 1; plus float64 gradcheck through padded columns. The spawned ranks use plain
gloo groups and never import megatron-core, proving the op only uses its `group=` argument.

Tolerances: values 1e-5 absolute for fp32 and bf16 alike (bf16 logits are upcast exactly
to fp32 before any arithmetic, so they see the same fp32 rounding). Gradients: fp32
max|diff| <= 1e-5 * max|ref|; bf16 gradients are returned in bf16, so each element carries
its bf16 rounding (unit roundoff 2^-9): |diff| <= 2^-8 |ref| + 1e-6 max|ref|.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_ops_logprobs.py
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist import run_ranks
from megaent.ops import vocab_parallel_logprobs_entropy

CASES = [  # name, V, leading shape, dtype, temperature, padding, which outputs get a gradient, scale, offset
    dict(name="v1001_fp32", v=1001, lead=(2, 5), dtype=torch.float32, temp=1.0, pad="-inf", grads="both"),
    dict(name="v1001_fp32_t07_finfo", v=1001, lead=(2, 5), dtype=torch.float32, temp=0.7, pad="finfo",
         grads="both"),
    dict(name="v1001_bf16_t13", v=1001, lead=(2, 5), dtype=torch.bfloat16, temp=1.3, pad="-inf", grads="both"),
    dict(name="v1001_fp32_offset300_logp_only", v=1001, lead=(7,), dtype=torch.float32, temp=1.0, pad="-inf",
         grads="logp", scale=20.0, offset=300.0),
    dict(name="v1001_fp32_entropy_only", v=1001, lead=(7,), dtype=torch.float32, temp=0.7, pad="-inf",
         grads="entropy"),
    dict(name="v32000_fp32_t07", v=32000, lead=(6,), dtype=torch.float32, temp=0.7, pad="-inf", grads="both"),
    dict(name="v32000_bf16_finfo", v=32000, lead=(6,), dtype=torch.bfloat16, temp=1.0, pad="finfo",
         grads="both"),
]
IDS = [c["name"] for c in CASES]


def make_case(i: int):
    c = CASES[i]
    g = torch.Generator().manual_seed(1000 + i)
    logits = torch.randn(*c["lead"], c["v"], generator=g) * c.get("scale", 3.0) + c.get("offset", 0.0)
    targets = torch.randint(0, c["v"], c["lead"], generator=g)
    w_lp, w_ent = torch.randn(c["lead"], generator=g), torch.randn(c["lead"], generator=g)
    return logits.to(c["dtype"]), targets, w_lp, w_ent


def pad_value(c) -> float:
    return float("-inf") if c["pad"] == "-inf" else torch.finfo(c["dtype"]).min


def loss_of(c, logp, ent, w_lp, w_ent):
    loss = 0.0
    if c["grads"] in ("both", "logp"):
        loss = loss + (logp * w_lp).sum()
    if c["grads"] in ("both", "entropy"):
        loss = loss + (ent * w_ent).sum()
    return loss


def run_op(c, shard, targets, w_lp, w_ent, group=None, vocab_start=None):
    x = shard.clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs_entropy(x, targets, group, temperature=c["temp"], vocab_start=vocab_start)
    loss_of(c, logp, ent, w_lp, w_ent).backward()
    return logp.detach(), ent.detach(), x.grad


def reference(i: int):
    c = CASES[i]
    logits, targets, w_lp, w_ent = make_case(i)
    x = logits.double().requires_grad_()
    logp, ent = ref.logprobs_entropy(x, targets, c["temp"])
    loss_of(c, logp, ent, w_lp.double(), w_ent.double()).backward()
    return logp.detach(), ent.detach(), x.grad


def check(i: int, logp, ent, grad_full_padded, tp: int):
    """grad_full_padded: the ranks' grads concatenated, [..., tp * Vl] in the op's dtype."""
    c = CASES[i]
    r_lp, r_ent, r_grad = reference(i)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(logp.double(), r_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-5, rtol=0)
    assert grad_full_padded.dtype == c["dtype"]
    grad, pad = grad_full_padded[..., :c["v"]].double(), grad_full_padded[..., c["v"]:]
    assert torch.all(pad == 0), "padded vocab columns must get exactly zero gradient"
    assert torch.isfinite(grad).all()
    scale = r_grad.abs().max()
    if c["dtype"] == torch.float32:
        assert (grad - r_grad).abs().max() <= 1e-5 * scale
    else:
        assert torch.all((grad - r_grad).abs() <= 2.0**-8 * r_grad.abs() + 1e-6 * scale)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_tp1_matches_reference(i):
    c = CASES[i]
    logits, targets, w_lp, w_ent = make_case(i)
    shard = ref.shard_columns(logits, 1, 0, pad_value(c))
    logp, ent, grad = run_op(c, torch.cat([shard, torch.full_like(shard[..., :3], pad_value(c))], -1), targets,
                             w_lp, w_ent)  # 3 extra padded columns even at TP=1
    check(i, logp, ent, grad, 1)


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
            logits, targets, w_lp, w_ent = make_case(i)
            shard = ref.shard_columns(logits, tp, tp_rank, pad_value(c))
            out[(tp, i)] = (tp_rank, run_op(c, shard, targets, w_lp, w_ent, group))
        # Explicit vocab_start: a reversed layout (TP rank r holds shard tp-1-r).
        logits, targets, w_lp, w_ent = make_case(0)
        r = tp - 1 - tp_rank
        shard = ref.shard_columns(logits, tp, r, pad_value(CASES[0]))
        out[(tp, "reversed")] = (r, run_op(CASES[0], shard, targets, w_lp, w_ent, group,
                                           vocab_start=r * shard.shape[-1]))
    out["megatron_imported"] = any(m.startswith("megatron") for m in sys.modules)
    dist.destroy_process_group()  # else dist.py's cleanup imports megatron-core just to tear down (~40 s)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tp_worker, 4)


def _gather(tp_results, key, tp):
    """Check every rank agrees on values; return (logp, ent, grads concatenated in shard order)."""
    grads = {}
    first = tp_results[0][key][1]
    for res in tp_results:
        shard_idx, (logp, ent, grad) = res[key]
        assert torch.equal(logp, first[0]) and torch.equal(ent, first[1]), "ranks disagree on the values"
        grads.setdefault(shard_idx, grad)
    assert sorted(grads) == list(range(tp))
    return first[0], first[1], torch.cat([grads[r] for r in range(tp)], dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_tp_matches_reference(tp_results, tp, i):
    check(i, *_gather(tp_results, (tp, i), tp), tp)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_explicit_vocab_start(tp_results, tp):
    check(0, *_gather(tp_results, (tp, "reversed"), tp), tp)


@pytest.mark.slow
def test_no_megatron_globals(tp_results):
    assert not any(r["megatron_imported"] for r in tp_results)


@pytest.mark.parametrize("pad", [float("-inf"), torch.finfo(torch.float64).min])
def test_gradcheck_float64_through_padding(pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (2, 3), generator=g)

    def f(x):
        padded = torch.cat([x, torch.full((2, 3, 2), pad, dtype=x.dtype)], dim=-1)
        return vocab_parallel_logprobs_entropy(padded, targets, temperature=0.7)

    assert torch.autograd.gradcheck(f, (x,))
    logp, ent = f(x)  # and the float64 values match the reference
    r_lp, r_ent = ref.logprobs_entropy(x, targets, 0.7)
    torch.testing.assert_close((logp, ent), (r_lp, r_ent), atol=1e-12, rtol=0)


def test_bad_inputs_name_the_problem():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="temperature=0"):
        vocab_parallel_logprobs_entropy(x, torch.zeros(4, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel_logprobs_entropy(x, torch.zeros(5, dtype=torch.long))
