"""megaent.ops.topk's fp32 <-> key maps against plain torch ordering (the distributed top-k itself is
checked against single-process references in test_cov_selection.py and test_ops_metrics.py).

    OMP_NUM_THREADS=1 python -m pytest tests/test_ops_topk.py -q
"""
import torch

from megaent.ops.topk import key_to_f32, kth_largest_key, ordered_key_f32


def test_keys_keep_fp32_order_and_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1000, generator=g) * 10 ** torch.randint(-30, 30, (1000,), generator=g),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])])
    keys = ordered_key_f32(x)
    assert keys.min() >= 0 and keys.max() < 2**32
    order = keys.argsort(stable=True)
    assert torch.all(x[order][1:] >= x[order][:-1])  # non-decreasing values along increasing keys
    assert torch.equal(key_to_f32(keys).view(torch.int32), x.view(torch.int32))  # bit-exact, -0.0 included
    assert key_to_f32(keys[3]).item() == x[3].item()  # 0-d


def test_kth_largest_single_process_matches_sort() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, generator=g)
    keys = torch.where(torch.arange(257) % 3 == 0, -1, ordered_key_f32(x))  # a third excluded
    valid = x[torch.arange(257) % 3 != 0].sort(descending=True).values
    for k in (1, 2, 50, valid.numel()):
        t = kth_largest_key(keys, torch.tensor(k), bits=32)
        assert key_to_f32(t).item() == valid[k - 1].item()
