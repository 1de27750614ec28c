"""Packing, token-balanced splitting and the log-probs of packed vs padded sequences.

Packing is checked against the samples it was built from (targets are the next tokens, the mask covers
exactly the response, positions restart per sample, per-token values land on the predicting position).
The split is checked against brute-force bounds (budget kept, every sample once, the count equals
first-fit-decreasing's). Group partitioning keeps groups whole. Log-probs: megaent's packed micro-batches
through `compute_logprobs` (the megatron-core GPTModel policy, one process) vs the HF `transformers` model on a left-padded
batch with an attention mask, plain log_softmax (tolerance 1e-5, fp32).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_batching.py
"""
from __future__ import annotations

import os

import pytest
import torch

from megaent.trainer.batching import (TrainSample, equalize_micro_batches, pack, partition_groups,
                                      split_token_balanced, unpack_response)


def _samples(n=9, seed=0, vocab=50):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        L = int(torch.randint(3, 12, (1,), generator=g))
        p = int(torch.randint(1, L, (1,), generator=g))
        out.append(TrainSample(tokens=torch.randint(0, vocab, (L,), generator=g), prompt_len=p,
                               advantage=float(k), old_logprobs=-torch.rand(L - p, generator=g), group=k // 3,
                               uid=k))
    return out


def test_pack_layout_matches_samples():
    ss = _samples()
    mb = pack(ss)
    assert mb.input_ids.shape == (1, sum(len(s) for s in ss))
    for s, off in zip(ss, mb.offsets):
        n, p = len(s), s.prompt_len
        row = slice(off, off + n)
        assert torch.equal(mb.input_ids[0, row], s.tokens)
        assert torch.equal(mb.position_ids[0, row], torch.arange(n))
        assert torch.equal(mb.targets[0, off:off + n - 1], s.tokens[1:])
        want_mask = torch.tensor([1.0 if p - 1 <= i < n - 1 else 0.0 for i in range(n)])
        assert torch.equal(mb.mask[0, row], want_mask)
        assert torch.equal(unpack_response(mb.old_logprobs, mb)[s.uid], s.old_logprobs)
        assert torch.all(unpack_response(mb.advantages, mb)[s.uid] == s.advantage)
    assert len(set(mb.segment_ids[0].tolist())) == len(ss)
    assert len(set(mb.token_uid[0].tolist())) == mb.token_uid.numel()
    empty = pack([])
    assert empty.is_empty and empty.mask.sum() == 0
    with pytest.raises(ValueError, match="prompt_len"):
        pack([TrainSample(tokens=torch.arange(3), prompt_len=3)])


@pytest.mark.parametrize("budget", [12, 20, 33, 1000])
def test_split_keeps_budget_and_covers_every_sample(budget):
    lens = [len(s) for s in _samples(n=15, seed=3)]
    bins = split_token_balanced(lens, max_tokens=budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lens)))
    assert all(sum(lens[i] for i in b) <= budget or len(b) == 1 for b in bins)
    # never more micro-batches than first-fit-decreasing (a plain re-implementation here)
    loads = []
    for l in sorted(lens, reverse=True):
        for j, ld in enumerate(loads):
            if ld + l <= budget:
                loads[j] += l
                break
        else:
            loads.append(l)
    assert len(bins) == len(loads)
    if budget >= sum(lens):
        assert len(bins) == 1


def test_equalize_and_partition():
    mbs = equalize_micro_batches([pack(_samples(2))], dp_group=None)
    assert len(mbs) == 1
    parts = partition_groups(_samples(n=12), 3)
    for part in parts:
        for s in part:  # groups whole: every member of s's group is in this part
            assert sum(t.group == s.group for t in part) == 3
    loads = [sum(len(s) for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(len(s) for s in _samples(n=12)) * 3


@pytest.mark.slow
def test_packed_logprobs_equal_padded_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_tiny import make_tiny_hf
    from megaent.model import load_hf
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.parallel.launch import free_port
    from megaent.trainer.batching import make_micro_batches
    from megaent.trainer.update import compute_logprobs

    hf_dir = make_tiny_hf(tmp_path / "hf", family="qwen2", hidden=32, layers=2, heads=4, kv_heads=2, seed=2)
    ss = _samples(n=6, seed=5, vocab=1000)
    # reference: one left-padded batch, attention mask, explicit position ids, plain log_softmax
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    S = max(len(s) for s in ss)
    ids = torch.zeros(len(ss), S, dtype=torch.long)
    att = torch.zeros(len(ss), S, dtype=torch.long)
    for i, s in enumerate(ss):
        ids[i, S - len(s):], att[i, S - len(s):] = s.tokens, 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        lp_all = torch.log_softmax(model(ids, attention_mask=att, position_ids=pos).logits.float(), -1)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        st = init_parallel(1, 1)
        from megaent.trainer.mcore_engine import build_engine

        policy = load_hf(hf_dir, st, engine="mcore")
        mbs = [mb.to(st.device) for mb in make_micro_batches(ss, max_tokens=25, share_prefix=False)]
        assert len(mbs) >= 2 and any(len(mb.uids) > 1 for mb in mbs)
        got = compute_logprobs(build_engine(policy, st, lr=0.0), mbs, state=st, fill_old=True, samples=ss)
    finally:
        destroy_parallel()
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
    for i, s in enumerate(ss):
        off = S - len(s)
        want = lp_all[i, off + s.prompt_len - 1:S - 1].gather(-1, s.tokens[s.prompt_len:, None])[:, 0]
        assert (got[s.uid][0] - want).abs().max() < 1e-5
        assert torch.equal(s.old_logprobs, got[s.uid][0])  # fill_old wrote the samples
