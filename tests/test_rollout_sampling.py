"""Sampling math of `megaent.rollout.sampling` against independent references.

- the int64 splitmix64 hash against a pure-Python (arbitrary-precision) splitmix64;
- log-probs against torch.log_softmax(logits / T) of the full vocabulary;
- empirical token frequencies (many rows, independent streams) against the
  truncated, renormalised distribution computed here in float64 with plain
  Python loops (top-k first, then top-p on the exclusive cumulative sum);
- greedy rows against argmax; row streams independent of the batch they sit in.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_sampling.py
"""
import math

import torch

from megaent.rollout.sampling import counter_uniform, mix64, row_keys, sample_next
from megaent.rollout.types import SamplingParams

_M = (1 << 64) - 1


def _ref_mix(x: int) -> int:
    x &= _M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M
    return x ^ (x >> 31)


def test_mix64_matches_python_splitmix64():
    xs = [0, 1, 2, 12345, -7, 2**62 + 3, -(2**63), 2**63 - 1] + [int(v) for v in torch.randint(-2**62, 2**62, (50,))]
    out = mix64(torch.tensor(xs, dtype=torch.int64))
    assert [int(o) & _M for o in out] == [_ref_mix(x) for x in xs]


def test_counter_uniform_range_and_independence():
    keys = row_keys(torch.full((4000,), 3), torch.arange(4000), torch.zeros(4000, dtype=torch.long))
    u0, u1 = counter_uniform(keys, 0), counter_uniform(keys, 1)
    assert u0.min() >= 0 and u0.max() < 1
    assert abs(float(u0.mean()) - 0.5) < 0.02 and abs(float(u0.var()) - 1 / 12) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.05
    # A row's stream depends only on its own (seed, prompt, sample) key, not on the batch around it.
    one = row_keys(torch.tensor([3]), torch.tensor([17]), torch.tensor([0]))
    assert torch.equal(counter_uniform(one, 5), counter_uniform(keys[17:18], 5))


def _ref_dist(logits: list[float], temperature: float, top_p: float, top_k: int) -> list[float]:
    z = [v / temperature for v in logits]
    m = max(z)
    p = [math.exp(v - m) for v in z]
    s = sum(p)
    p = [v / s for v in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep, cum = set(), 0.0
    for rank, i in enumerate(order):
        if top_k > 0 and rank >= top_k:
            break
        if cum > top_p:
            break
        keep.add(i)
        cum += p[i]
    q = [p[i] if i in keep else 0.0 for i in range(len(p))]
    s = sum(q)
    return [v / s for v in q]


def _frequencies(logits, temperature, top_p, top_k, n=40000, seed=0):
    b = n
    rows = logits.unsqueeze(0).expand(b, -1)
    keys = row_keys(torch.full((b,), seed), torch.arange(b), torch.zeros(b, dtype=torch.long))
    tok, lp = sample_next(rows, temperature=torch.full((b,), temperature), top_p=torch.full((b,), top_p),
                          top_k=torch.full((b,), top_k, dtype=torch.long), uniform=counter_uniform(keys, 0))
    return torch.bincount(tok, minlength=logits.numel()).double() / b, tok, lp


def test_sampled_frequencies_match_reference_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, generator=g) * 1.5
    for temperature, top_p, top_k in [(1.0, 1.0, -1), (0.7, 1.0, -1), (1.0, 0.8, -1), (1.3, 1.0, 4), (0.9, 0.6, 5)]:
        freq, tok, lp = _frequencies(logits, temperature, top_p, top_k)
        ref = torch.tensor(_ref_dist(logits.tolist(), temperature, top_p, top_k), dtype=torch.float64)
        # 40k draws: the standard error of a frequency is <= 0.0025; 0.012 is > 4.5 sigma.
        assert (freq - ref).abs().max() < 0.012, (temperature, top_p, top_k, freq, ref)
        assert bool((freq[ref == 0] == 0).all()), "a truncated token was sampled"
        # Returned log-probs are the UNtruncated log softmax(logits / T).
        full = torch.log_softmax(logits / temperature, dim=-1)
        torch.testing.assert_close(lp, full[tok], rtol=0, atol=1e-6)


def test_greedy_rows_and_mixed_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=g)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    top_k = torch.tensor([-1, 3, 2, -1, -1, 5])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 1.0, 1.0])
    u = torch.rand(6, generator=g)
    tok, lp = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, uniform=u)
    greedy = temperature == 0
    assert torch.equal(tok[greedy], logits.argmax(-1)[greedy])
    t = torch.where(greedy, 1.0, temperature)
    torch.testing.assert_close(lp, torch.log_softmax(logits / t[:, None], -1).gather(-1, tok[:, None])[:, 0],
                               rtol=0, atol=1e-6)
    # Row 1 (top-k 3) must pick one of its 3 best tokens; a row alone gives the same token as in the batch.
    assert int(tok[1]) in logits[1].topk(3).indices.tolist()
    for r in range(6):
        t1, _ = sample_next(logits[r:r + 1], temperature=temperature[r:r + 1], top_p=top_p[r:r + 1],
                            top_k=top_k[r:r + 1], uniform=u[r:r + 1])
        assert int(t1) == int(tok[r])


def test_sampling_params_errors_name_the_field():
    import pytest

    for kw, field in [({"n": 0}, "n=0"), ({"top_p": 0.0}, "top_p=0.0"), ({"temperature": -1.0}, "temperature"),
                      ({"top_k": -3}, "top_k=-3"), ({"max_new_tokens": 0}, "max_new_tokens=0")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
