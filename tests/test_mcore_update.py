"""One RL update on megatron-core's engine (`megaent.trainer.mcore_engine`) at (tp, pp, dp) layouts vs one process.

A tiny random Llama 3 checkpoint (tests/hf_tiny.py, untied, GQA, vocab 1001 so TP=2 pads) and 8 fixed samples
(tokens, prompt length, advantage). Each layout packs its DP rank's samples (every dp-th) into THD micro-batches of
two samples, computes old log-probs with a forward-only schedule pass, then runs PPO's loss over the global token
denominator through `get_forward_backward_func` (1F1B with PP = 2), megatron-core DDP (overlapped reduce) and
`get_megatron_optimizer`. Sequence parallel is on whenever TP = 2.

Compared against the same code in one process (tp = pp = dp = 1, all 8 samples, 4 micro-batches):
- the fp32 main gradients of one update (distributed optimizer off), as full HF-named tensors: <= 1e-5 relative
  to the largest entry (float rounding of reordered sums);
- the global gradient norm megatron-core clips by, at each of 3 steps (rtol 1e-5);
- the weights after 3 optimizer steps with the distributed optimizer on when DP > 1: <= 1e-5 absolute (Adam's
  first steps move each weight by ~lr = 1e-3, so this is 1% of the update; Adam's eps is 1e-6, as in
  tests/test_update_layouts.py, so gradients at round-off level cannot flip an update).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_mcore_update.py -q
(2, 2, 2) needs 8 ranks: MEGAENT_WORLD8=1 adds it (opt-in: 8 processes on the 2-core CI machine).
"""
from __future__ import annotations

import os

import pytest
import torch

from dist import run_ranks
from hf_tiny import make_tiny_hf

V = 1001
LR = 1e-3
EPS = 1e-6  # as tests/test_update_layouts.py: grads at round-off level cannot flip an Adam update of ~lr
WORLD_LAYOUTS = {2: [(2, 1), (1, 2), (1, 1)], 4: [(2, 2), (2, 1), (1, 2)]}  # (tp, pp); dp = world / (tp * pp)
if os.environ.get("MEGAENT_WORLD8") == "1":  # (2, 2, 2), the last of {1,2}^3: 8 gloo ranks, opt-in on 2 cores
    WORLD_LAYOUTS[8] = [(2, 2)]


def _samples() -> list[tuple[torch.Tensor, int, float]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(8):
        n = int(torch.randint(6, 12, (1,), generator=g))
        out.append((torch.randint(0, V, (n,), generator=g), int(torch.randint(2, 5, (1,), generator=g)),
                    float(torch.randn(1, generator=g))))
    return out


def _full(policy, st, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This stage's megaent-layout shards -> full HF-named tensors (all-gather over TP)."""
    import torch.distributed as dist

    from megaent.model import megaent_to_hf

    per_rank: list[dict] = [{} for _ in range(st.tp)]
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(st.tp)]
        dist.all_gather(parts, t.contiguous(), group=st.tp_group)
        for r in range(st.tp):
            per_rank[r][name] = parts[r]
    return megaent_to_hf(per_rank, policy.arch)


def _run_layout(hf_dir: str, tp: int, pp: int, *, steps: int, distopt: bool | None) -> dict:
    from megaent.algorithms import loss_denominator, policy_loss
    from megaent.config.schema import LossConfig
    from megaent.model import load_hf
    from megaent.parallel import init_parallel
    from megaent.trainer.batching import TrainSample, pack
    from megaent.trainer.mcore_engine import build_engine, forward_backward

    st = init_parallel(tp, pp)
    pol = load_hf(hf_dir, st, engine="mcore")
    eng = build_engine(pol, st, lr=LR, eps=EPS, clip_grad=1.0, distributed_optimizer=distopt)
    mine = _samples()[st.dp_rank::st.dp]
    mult = tp if pol.config.sequence_parallel else 1
    mine = [TrainSample(tokens=t, prompt_len=p, advantage=a) for t, p, a in mine]
    mbs = [pack(mine[i:i + 2], share_prefix=False, multiple=mult).to(st.device) for i in range(0, len(mine), 2)]
    cfg = LossConfig()
    dp = st.dp_group if st.dp > 1 else None
    norms = []
    for _ in range(steps):
        old = forward_backward(eng, mbs, None, forward_only=True)
        if st.is_last_stage:
            for mb, o in zip(mbs, old):
                mb.old_logprobs = o["logprobs"]
        else:  # every stage holds the micro-batches; only the last stage's loss reads old log-probs
            for mb in mbs:
                mb.old_logprobs = torch.zeros_like(mb.mask)
        denom = loss_denominator([mb.mask for mb in mbs], cfg, dp)

        def loss_fn(lp, ent, mb):
            return policy_loss(lp, mb.old_logprobs, mb.advantages, mb.mask, cfg, dp, None, denominator=denom)

        forward_backward(eng, mbs, loss_fn)
        if steps == 1:
            named = dict(pol.named_parameters())
            grads = {s.name: pol._from_mcore(s.name, named[pol.mcore_name(s.name)].main_grad)
                     for s in pol.param_specs()}
            full = _full(pol, st, grads)
            return full if st.tp_rank == 0 and st.dp_rank == 0 else {}
        norms.append(eng.step()["grad_norm"])
    full = _full(pol, st, {k: v.detach() for k, v in pol.megaent_params().items()})
    full["grad_norms"] = torch.tensor(norms, dtype=torch.float64)
    return full if st.tp_rank == 0 and st.dp_rank == 0 else {}


def _spawned(rank: int, world: int, hf_dir: str, layouts: list) -> dict:
    res = {}
    for tp, pp in layouts:
        res[(tp, pp, world // (tp * pp), "grads")] = _run_layout(hf_dir, tp, pp, steps=1, distopt=False)
        res[(tp, pp, world // (tp * pp), "weights")] = _run_layout(hf_dir, tp, pp, steps=3, distopt=None)
    return res


def _merge(per_rank: list[dict]) -> dict:
    out: dict = {}
    for r in per_rank:
        for key, tensors in r.items():
            out.setdefault(key, {}).update(tensors)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf_dir = str(make_tiny_hf(tmp_path_factory.mktemp("mcore_update") / "llama", family="llama", vocab_size=V,
                              hidden=64, layers=4, heads=4, kv_heads=2))
    res = _merge(run_ranks(_spawned, 1, hf_dir, [(1, 1)]))
    for world, layouts in WORLD_LAYOUTS.items():
        res.update(_merge(run_ranks(_spawned, world, hf_dir, layouts)))
    return res


LAYOUTS = [(tp, pp, w // (tp * pp)) for w, ls in WORLD_LAYOUTS.items() for tp, pp in ls]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_gradients_of_one_update_match_one_process(results, tp, pp, dp):
    ref, got = results[(1, 1, 1, "grads")], results[(tp, pp, dp, "grads")]
    assert set(got) == set(ref)
    for k in ref:
        scale = ref[k].abs().max().clamp(min=1e-6)
        assert (got[k] - ref[k]).abs().max() <= 1e-5 * scale, k
    assert any(ref[k].abs().max() > 0 for k in ref)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_weights_after_three_steps_match_one_process(results, tp, pp, dp):
    ref, got = results[(1, 1, 1, "weights")], results[(tp, pp, dp, "weights")]
    assert set(got) == set(ref)
    # clipping's global norm over all shards (TP-sharded weights counted once per shard, replicas once)
    assert torch.allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-5)
    for k in set(ref) - {"grad_norms"}:
        assert (got[k] - ref[k]).abs().max() <= 1e-5, k


def test_lr_schedule_closed_form():
    import math

    from megaent.trainer.mcore_engine import lr_at

    kw = dict(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1, total_steps=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 15):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 10))
        assert abs(lr_at(s, **kw) - want) < 1e-12
    assert lr_at(100, lr=2.0) == 2.0
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(5, lr=1.0, schedule="cosine")
