"""Entropy and covariance metrics over all valid tokens of a group, as 0-d fp32 tensors.

Metrics are detached (no gradient) and never sync with the host: the trainer gathers
them once per step. Both are split-invariant: any distribution of the same tokens over
the ranks of `group` gives the same value (up to fp32 summation order).

`top_fraction_mean` is the paper's "top 0.02% covariance mean" (Cui et al. 2025, Sec. 4:
the mean of the largest max(1, int(q * N)) per-token covariances). It finds the exact
global k-th largest value by a 4-round radix select on the order-preserving 32-bit
integer image of the fp32 values: each round histograms one byte of the keys that match
the prefix found so far, all-reduces the 256 counts and picks the byte where the running
count from the top reaches k. (Radix select as in GPU top-k kernels, e.g. PyTorch's
`topk` / CUB; here across ranks.) Unlike gathering every rank's local top-k, this needs
no host-side k, and its traffic is O(256) per round whatever k is.
Collectives: 1 + 4 + 1 all-reduces on `group` (count; 4 histograms; sum above threshold).
"""
from __future__ import annotations

import torch

from megaent.ops.logprobs import Group, all_reduce_sum
from megaent.ops.stats import masked_mean


def token_mean_entropy(entropy: torch.Tensor, mask: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Mean entropy over valid tokens of all ranks of `group`.

    entropy [..., T] any float, mask [..., T] bool -> 0-d fp32 (0 when no valid token);
    1 all-reduce of a 2-vector on `group`.
    """
    return masked_mean(entropy.detach(), mask, group)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """fp32 [N] -> int64 [N] in [0, 2^32), monotone in the float value (-0.0 just below +0.0)."""
    bits = x.contiguous().view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits -> signed int order
    return keys.to(torch.int64) + 2**31


def _key_to_float(key: torch.Tensor) -> torch.Tensor:
    """Inverse of `_order_keys` for a 0-d int64 key -> 0-d fp32."""
    k32 = (key - 2**31).to(torch.int32)
    bits = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)  # the mapping is an involution
    return bits.reshape(1).view(torch.float32).reshape(())


def _kth_largest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, group: Group) -> torch.Tensor:
    """Exact key of the global k-th largest valid element (k 0-d int64 >= 1); 4 all-reduces of [256]."""
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)
    k_left = k.clone()
    for shift in (24, 16, 8, 0):
        if shift == 24:
            cand = valid
        else:
            cand = valid & ((keys >> (shift + 8)) == (prefix >> (shift + 8)))
        byte = (keys >> shift) & 255
        hist = torch.zeros(256, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(0, byte, cand.to(torch.int64))
        hist = all_reduce_sum(hist, group)
        at_or_above = hist.flip(0).cumsum(0).flip(0)  # [256]: candidates with byte >= b
        b = ((at_or_above >= k_left).sum() - 1).clamp(min=0)  # largest byte whose count reaches k_left
        k_left = k_left - (at_or_above[b] - hist[b])  # drop those strictly above byte b
        prefix = prefix | (b << shift)
    return prefix


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
    n = all_reduce_sum(valid.sum().to(torch.int64), group)  # collective 1
    # int(q * N) as Python computes it (double product, floor), kept on the device.
    k = torch.floor(torch.tensor(q, dtype=torch.float64, device=x.device) * n.to(torch.float64)).to(torch.int64)
    k = k.clamp(min=1)
    keys = _order_keys(x)
    thr_key = _kth_largest_key(keys, valid, k, group)  # collectives 2-5
    above = valid & (keys > thr_key)
    part = torch.stack([torch.where(above, x, torch.zeros_like(x)).to(torch.float64).sum(),
                        above.sum().to(torch.float64)])
    part = all_reduce_sum(part, group)  # collective 6
    total = part[0] + (k.to(torch.float64) - part[1]) * _key_to_float(thr_key).to(torch.float64)
    mean = (total / k.to(torch.float64)).to(torch.float32)
    return torch.where(n > 0, mean, torch.zeros_like(mean))
