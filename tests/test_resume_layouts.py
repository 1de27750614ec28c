"""A checkpoint saved at one layout resumes exactly at another: model, fp32 main parameters and Adam moments.

Two Clip-Cov updates of a tiny Qwen2 on megatron-core's engine. Reference: one process running both updates
uninterrupted (itself checked against HF `transformers` + `torch.optim.AdamW` in tests/test_update_layouts.py).
Interrupted: update 1 at (tp, pp, dp) = (1, 1, 2) with the distributed optimizer (each DP rank holds half of
the flat optimizer state), checkpoint (`canonical_state` -> `save_checkpoint`, torch.distributed.checkpoint),
then, in fresh processes, resume at (2, 1, 1) with sequence parallel and at (1, 2, 1) (`load_checkpoint` ->
`finish_load`), update 2, and compare every weight with the reference (1e-5, fp32): a moment lost, zeroed or
misplaced in the resharding moves the second update by about lr = 1e-3. The reverse direction, TP = 2 saved and
DP = 2 with the distributed optimizer resumed, is checked the same way.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_resume_layouts.py   (about 1-2 minutes on 2 cores)
"""
from __future__ import annotations

import glob

import pytest
import torch

from dist import run_ranks
from test_update_layouts import CC, CLIP, EPS, GEN_SEED, LR, WD, make_data


def _session(rank, world, tp, pp, hf_dir, data, ckpt, steps, resume, out):
    """Run `steps` (1 or 2) of the 2-update schedule at (tp, pp); save after update 1 or resume before 2."""
    from safetensors.torch import load_file

    from megaent.config.schema import LossConfig
    from megaent.model import load_hf, save_hf
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.batching import TrainSample, make_micro_batches, scatter_samples
    from megaent.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megaent.trainer.mcore_engine import build_engine
    from megaent.trainer.state_dict import canonical_state, finish_load
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(tp, pp)
    try:
        policy = load_hf(hf_dir, st, engine="mcore")
        engine = build_engine(policy, st, lr=LR, weight_decay=WD, eps=EPS, clip_grad=CLIP)
        samples = [TrainSample(tokens=d["tokens"], prompt_len=d["prompt_len"], advantage=d["advantage"],
                               group=d["group"], uid=d["uid"]) for d in data] if st.rank == 0 else None
        mine = scatter_samples(samples, dp_rank=st.dp_rank, dp=st.dp)
        multiple = tp if policy.config.sequence_parallel else 1
        cfg = LossConfig(policy_loss="clip_cov", **CC)

        def update(k: int) -> None:
            mbs = make_micro_batches(mine, max_tokens=40, dp_group=st.dp_group, share_prefix=False,
                                     multiple=multiple, device=st.device)
            compute_logprobs(engine, mbs, state=st, fill_old=True, samples=mine)
            for mb in mbs:  # old log-probs slightly off the current ones, so that PPO clipping matters
                mb.old_logprobs = mb.old_logprobs + 0.05 * mb.mask * ((mb.token_uid % 7).float() - 3)
            train_mini_batch(engine, mbs, loss_cfg=cfg, state=st,
                             generator=torch.Generator().manual_seed(GEN_SEED + k))

        if resume:
            tensors = canonical_state(policy, engine, st, loading=True)
            load_checkpoint(latest_checkpoint(ckpt), tensors, rank=st.rank, restore_rng=False)
            finish_load(policy, engine, tensors, step=1)
        first = 2 if resume else 1
        for k in range(first, steps + 1):
            update(k)
            if k == 1 and ckpt is not None and not resume:
                save_checkpoint(ckpt, 1, canonical_state(policy, engine, st, loading=False), {"optimizer_steps": 1},
                                rank=st.rank)
        save_hf(policy, st, out)
        if st.rank != 0:
            return None
        sd = {}
        for f in glob.glob(f"{out}/*.safetensors"):
            sd.update(load_file(f))
        return sd
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hf_tiny import make_tiny_hf

    d = tmp_path_factory.mktemp("resume")
    hf_dir = str(make_tiny_hf(d / "hf", family="qwen2", hidden=32, layers=4, heads=4, kv_heads=2, seed=1))
    data = make_data()
    ref = run_ranks(_session, 1, 1, 1, hf_dir, data, None, 2, False, str(d / "ref"))[0]
    one = run_ranks(_session, 1, 1, 1, hf_dir, data, None, 1, False, str(d / "one"))[0]
    moved = max(float((ref[k] - one[k]).abs().max()) for k in ref)
    assert moved > 1e-4, "the second update must move the weights, or the comparison below proves nothing"
    return hf_dir, data, ref, d


def _err(sd, ref):
    assert set(sd) == set(ref)
    return max(float((sd[k] - v).abs().max()) for k, v in ref.items())


@pytest.mark.slow
@pytest.mark.parametrize("save, resume", [((1, 1), [(2, 1), (1, 2)]), ((2, 1), [(1, 1)])],
                         ids=["dp2-distopt_to_tp2-and-pp2", "tp2_to_dp2-distopt"])
def test_resume_on_another_layout_is_exact(setup, save, resume):
    hf_dir, data, ref, d = setup
    ckpt = d / f"ckpt-{save[0]}{save[1]}"
    run_ranks(_session, 2, *save, hf_dir, data, str(ckpt), 1, False, str(d / "saved"))
    for tp, pp in resume:
        sd = run_ranks(_session, 2, tp, pp, hf_dir, data, str(ckpt), 2, True, str(d / f"res{tp}{pp}"))[0]
        assert _err(sd, ref) <= 1e-5, (save, (tp, pp), _err(sd, ref))
