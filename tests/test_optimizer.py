"""DistributedAdamW vs torch references.

Single process: the LR schedule vs its closed form; a clipped AdamW step vs `torch.optim.AdamW` +
`clip_grad_norm_`; bf16 params with fp32 masters vs an fp32 AdamW on the same (bf16) grads; a non-finite
norm skips the step; state_dict round trip continues identically. Two gloo ranks (DP = 2): ZeRO-1 gives
the same parameters as the replicated optimizer, and TP = 2 counts replicated params once in the norm
(vs the norm of the full gradient computed in the test).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_optimizer.py
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dist import run_ranks
from megaent.config.schema import OptimizerConfig
from megaent.trainer.optimizer import DistributedAdamW, lr_at

SOLO = SimpleNamespace(tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, is_first_stage=True, is_last_stage=True,
                       mp_group=None, dp_group=None, dp_ranks=[0], device=torch.device("cpu"))


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    return m.to(dtype)


def _grads(model, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def test_lr_schedule_closed_form():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg=cfg, total_steps=14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 15):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 10))
        assert abs(lr_at(s, cfg=cfg, total_steps=14) - want) < 1e-12
    assert lr_at(100, cfg=OptimizerConfig(lr=2.0), total_steps=None) == 2.0
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(5, cfg=OptimizerConfig(schedule="cosine"), total_steps=None)


@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the clip threshold
def test_step_matches_torch_adamw_with_clipping(scale):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, grad_clip=1.0, warmup_steps=2)
    mine, ref = _model(), _model()
    opt = DistributedAdamW(mine.parameters(), cfg=cfg, state=SOLO)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    nodecay = [p for p in ref.parameters() if p.dim() < 2]
    ropt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                             lr=1e-2)
    for step in range(3):
        _grads(mine, seed=step, scale=scale)
        _grads(ref, seed=step, scale=scale)
        stats = opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for gr in ropt.param_groups:
            gr["lr"] = 1e-2 * min(1.0, (step + 1) / 2)
        ropt.step()
        assert abs(float(stats["grad_norm"]) - float(norm)) < 1e-6 * float(norm)
        assert float(stats["lr"]) == pytest.approx(1e-2 * min(1.0, (step + 1) / 2))
        for a, b in zip(mine.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_bf16_params_keep_fp32_masters():
    cfg = OptimizerConfig(lr=1e-3, grad_clip=0.0)
    mine = _model(dtype=torch.bfloat16)
    ref = _model(dtype=torch.bfloat16).float()  # fp32 copy of the same bf16 values
    opt = DistributedAdamW(mine.parameters(), cfg=cfg, state=SOLO)
    ropt = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.dim() >= 2]},
                              {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-3, weight_decay=0.0)
    for step in range(3):
        _grads(mine, seed=step)
        for p, q in zip(ref.parameters(), mine.parameters()):
            p.grad = q.grad.float()  # the same bf16-rounded grads
        opt.step()
        ropt.step()
    for i, (p, q) in enumerate(zip(mine.parameters(), ref.parameters())):
        torch.testing.assert_close(opt.masters[i], q, rtol=0, atol=1e-7)  # masters follow fp32 AdamW exactly
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16))


def test_nonfinite_norm_skips_and_state_round_trip():
    cfg = OptimizerConfig(lr=1e-2)
    m = _model()
    opt = DistributedAdamW(m.parameters(), cfg=cfg, state=SOLO)
    _grads(m)
    opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    _grads(m)
    next(m.parameters()).grad[0, 0] = float("nan")
    stats = opt.step()
    assert float(stats["skipped"]) == 1.0 and opt.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    sd = opt.state_dict()
    m2 = _model()
    with torch.no_grad():
        for a, b in zip(m2.parameters(), m.parameters()):
            a.copy_(b)
    opt2 = DistributedAdamW(m2.parameters(), cfg=cfg, state=SOLO)
    opt2.load_state_dict(sd)
    _grads(m, seed=7)
    _grads(m2, seed=7)
    opt.step()
    opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def _dist_checks(rank, world):
    from megaent.parallel import init_parallel
    from megaent.trainer.optimizer import build_optimizer

    out = {}
    st = init_parallel(1, 1)  # DP = 2: ZeRO-1 vs replicated
    res = {}
    for zero1 in (False, True):
        m = _model()
        opt = build_optimizer(m, cfg=OptimizerConfig(lr=1e-2, weight_decay=0.1, zero1=zero1), state=st)
        for step in range(2):
            _grads(m, seed=step)  # same grads on both ranks (as after the DP all-reduce)
            opt.step()
        res[zero1] = [p.detach().clone() for p in m.parameters()]
        out[f"owned_{zero1}"] = len(opt.owned)
    out["zero1_err"] = max(float((a - b).abs().max()) for a, b in zip(res[False], res[True]))
    st = init_parallel(2, 1)  # TP = 2: a sharded weight and a replicated bias
    full_w = torch.arange(8.0).view(4, 2)
    bias = torch.tensor([0.5, -1.5])
    w = torch.nn.Parameter(full_w[2 * st.tp_rank: 2 * st.tp_rank + 2].clone())
    b = torch.nn.Parameter(torch.zeros(2))
    w.grad, b.grad = w.detach().clone(), bias.clone()
    w.tensor_model_parallel = True
    opt = DistributedAdamW([w, b], cfg=OptimizerConfig(), state=st)
    out["tp_norm"] = float(opt.grad_norm())
    out["tp_ref"] = float(torch.sqrt(full_w.pow(2).sum() + bias.pow(2).sum()))
    return out


@pytest.mark.slow
def test_zero1_and_tp_norm_two_ranks():
    for r in run_ranks(_dist_checks, 2):
        assert r["zero1_err"] < 1e-7
        assert r["owned_True"] < r["owned_False"]
        assert abs(r["tp_norm"] - r["tp_ref"]) < 1e-5
