"""Entropy and covariance metrics over all valid tokens of a group, as 0-d fp32 tensors.

Metrics are detached (no gradient) and never sync with the host: the trainer gathers
them once per step. Both are split-invariant: any distribution of the same tokens over
the ranks of `group` gives the same value (up to fp32 summation order).

`top_fraction_mean` is the paper's "top 0.02% covariance mean" (Cui et al. 2025, Sec. 4:
the mean of the largest max(1, int(q * N)) per-token covariances). It finds the exact
global k-th largest value with `megaent.ops.topk.kth_largest_key` (a 4-round radix select
on the order-preserving 32-bit integer image of the fp32 values, 256 counts all-reduced
per round), so it needs no host-side k, and its traffic is O(256) per round whatever k is.
Collectives: 1 + 4 + 1 all-reduces on `group` (count; 4 radix rounds; sum above threshold).
"""
from __future__ import annotations

import torch

from megaent.ops.stats import Group, global_sum, masked_mean
from megaent.ops.topk import key_to_f32, kth_largest_key, ordered_key_f32


def token_mean_entropy(entropy: torch.Tensor, mask: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Mean entropy over valid tokens of all ranks of `group`.

    entropy [..., T] any float, mask [..., T] bool -> 0-d fp32 (0 when no valid token);
    1 all-reduce of a 2-vector on `group`.
    """
    return masked_mean(entropy.detach(), mask, group)


def top_fraction_mean(values: torch.Tensor, mask: torch.Tensor, q: float, group: Group = None) -> torch.Tensor:
    """Mean of the largest max(1, int(q * N)) valid values over all ranks of `group`.

    values [..., T] any float (compared in fp32), mask [..., T] bool, q in (0, 1]
    (e.g. 2e-4 for the paper's top 0.02%), N = global count of valid values.
    Returns a 0-d fp32 tensor, 0 when no rank has a valid value. Ties at the k-th value
    are counted exactly k times in total. 6 all-reduces on `group`; no host sync.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q={q}: must be in (0, 1]; the paper's top 0.02% is q=2e-4")
    x = values.detach().reshape(-1).to(torch.float32)
    valid = mask.reshape(-1).to(torch.bool)
    if valid.shape != x.shape:
        raise ValueError(f"values shape {tuple(values.shape)} and mask shape {tuple(mask.shape)} must match")
    n = global_sum(valid.sum().to(torch.int64), group)  # collective 1
    # int(q * N) as Python computes it (double product, floor), kept on the device.
    k = torch.floor(torch.tensor(q, dtype=torch.float64, device=x.device) * n.to(torch.float64)).to(torch.int64)
    k = k.clamp(min=1)
    keys = ordered_key_f32(x)
    thr_key = kth_largest_key(torch.where(valid, keys, -1), k, bits=32, group=group)  # collectives 2-5
    above = valid & (keys > thr_key)
    part = torch.stack([torch.where(above, x, torch.zeros_like(x)).to(torch.float64).sum(),
                        above.sum().to(torch.float64)])
    part = global_sum(part, group)  # collective 6
    total = part[0] + (k.to(torch.float64) - part[1]) * key_to_f32(thr_key).to(torch.float64)
    mean = (total / k.to(torch.float64)).to(torch.float32)
    return torch.where(n > 0, mean, torch.zeros_like(mean))
