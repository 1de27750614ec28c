"""Packed-segment attention (`megaent.model.layers._segment_attention`) against a plain per-segment reference.

Reference: each segment cut out of its packed row and attended alone with causal SDPA (no layout, no index
tricks). Checks outputs and the gradients of q, k and v (autograd through the reference) for rows holding
segments of different lengths, GQA and MHA, so the custom gather/scatter backward is checked against
autograd's own.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_segment_attention.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from harness import attention_with_grads
from megaent.model.layers import SegmentLayout, _segment_attention


def _reference(q, k, v, segment_ids, gqa):
    b, nq, s, d = q.shape
    out = torch.zeros(b, s, nq, d, dtype=q.dtype)
    for r in range(b):
        ids = segment_ids[r].tolist()
        start = 0
        while start < s:
            end = start
            while end < s and ids[end] == ids[start]:
                end += 1
            o = F.scaled_dot_product_attention(q[r:r + 1, :, start:end], k[r:r + 1, :, start:end],
                                               v[r:r + 1, :, start:end], is_causal=True, scale=1 / math.sqrt(d),
                                               enable_gqa=gqa)
            out[r, start:end] = o[0].transpose(0, 1)
            start = end
    return out


@pytest.mark.parametrize("nq,nkv", [(4, 2), (2, 2)])
def test_segment_attention_and_its_gradients_match_per_segment_sdpa(nq, nkv):
    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 13, 8
    segment_ids = torch.tensor([[0] * 5 + [1] * 1 + [2] * 7, [3] * 9 + [4] * 4])
    q0, k0, v0 = (torch.randn(b, n, s, d, generator=g, dtype=torch.float64) for n in (nq, nkv, nkv))
    w = torch.randn(b, s, nq, d, generator=g, dtype=torch.float64)
    layout = SegmentLayout.from_segment_ids(segment_ids)
    got = attention_with_grads(lambda q, k, v: _segment_attention(q, k, v, layout, scale=1 / math.sqrt(d),
                                                                  gqa=nq != nkv), q0, k0, v0, w)
    ref = attention_with_grads(lambda q, k, v: _reference(q, k, v, segment_ids, nq != nkv), q0, k0, v0, w)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12, msg=name)
