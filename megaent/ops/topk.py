"""Exact global k-th largest and top-k over tokens spread across ranks, with no host sync.

The one top-k of megaent: Clip-Cov and KL-Cov (`megaent.algorithms.covariance`) pick k = max(1,
int(ratio * N)) tokens out of the N valid tokens of a whole mini-batch, and the paper's "top 0.02%
covariance" metric (`megaent.ops.metrics.top_fraction_mean`) averages the largest k values; the tokens
live on several data-parallel ranks (and micro-batches). verl reads N to the host (`.item()`) and runs
`topk`/`randperm` per micro-batch. Here k stays a device tensor and the k-th largest key is found by a radix
select over the key bits: each round all-reduces 256 counts ("how many keys are >= each of 256 candidate
thresholds", read off one local sort with searchsorted) and fixes 8 bits of the threshold. A 32-bit key
takes 4 rounds; the 63-bit tie-break key 8 more. (Radix select as in GPU top-k kernels, e.g. PyTorch's
`topk` / CUB; here across ranks.) Every rank runs the same fixed sequence of collectives whatever its data
(ranks with no valid token included), and the result is exactly the set one process would pick from the
concatenated batch. Gathering each rank's local k smallest instead would need k on the host and padded
gathers.

Keys are int64 >= 0, larger = preferred; a token outside the candidate set gets key -1.
`ordered_key_f32` maps fp32 values to such keys preserving their order; `key_to_f32` maps back.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megaent.ops.stats import global_sum

Group = Optional[dist.ProcessGroup]

_RADIX_BITS = 8
_KEY_BITS_F32 = 32
_KEY_BITS_UID = 63
INT63_MAX = (1 << 63) - 1


def ordered_key_f32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values -> int64 keys in [0, 2^32) with the same order (IEEE bits, sign-folded)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


def key_to_f32(key: torch.Tensor) -> torch.Tensor:
    """Inverse of `ordered_key_f32`: int64 keys in [0, 2^32) -> the fp32 values they came from."""
    bits = torch.where(key >= (1 << 31), key - (1 << 31), -1 - key).to(torch.int32)
    return bits.contiguous().view(torch.float32)


def _count_ge(sorted_keys: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """How many of `sorted_keys` are >= each threshold (int64 [J])."""
    return sorted_keys.numel() - torch.searchsorted(sorted_keys, thresholds)


def kth_largest_key(keys: torch.Tensor, k: torch.Tensor, *, bits: int, group: Group = None) -> torch.Tensor:
    """The k-th largest key over all ranks of `group`.

    keys: int64, any shape, values in [0, 2^bits) or -1 (excluded); k: 0-d int64 >= 1, equal on all ranks.
    Returns a 0-d int64 t with global count(keys >= t) >= k > count(keys > t). If fewer than k keys are
    valid the result is meaningless (callers check the total). Collectives: ceil(bits / 8) all-reduces of an
    int64 256-vector on `group`, the same sequence on every rank.
    """
    sorted_keys = keys.reshape(-1).sort().values
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)
    shift = bits
    while shift > 0:
        width = min(_RADIX_BITS, shift)
        shift -= width
        steps = torch.arange(1 << width, dtype=torch.int64, device=keys.device) << shift
        counts = global_sum(_count_ge(sorted_keys, prefix + steps), group)  # non-increasing in the step
        digit = ((counts >= k).sum() - 1).clamp(min=0)
        prefix = prefix + (digit << shift)
    return prefix


def global_topk_mask(primary: torch.Tensor, secondary: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor,
                     *, group: Group = None) -> torch.Tensor:
    """Mask of the k candidates with the largest (primary, secondary) keys, lexicographic, over `group`.

    primary: int64 in [0, 2^32); secondary: int64 in [0, 2^63), unique per token across ranks (a token id)
    so the choice is exact; candidates: bool; all the same shape (any). k: 0-d int64 >= 1. Returns a bool
    mask of that shape: exactly k tokens selected over all ranks, or every candidate when there are at
    most k. Collectives: 14 all-reduces on `group` (4 + 8 radix rounds, 2 counts).
    """
    cand = candidates.to(torch.bool)
    total = global_sum(cand.sum(), group)
    t1 = kth_largest_key(torch.where(cand, primary, -1), k, bits=_KEY_BITS_F32, group=group)
    above = cand & (primary > t1)
    tied = cand & (primary == t1)
    n_above = global_sum(above.sum(), group)
    t2 = kth_largest_key(torch.where(tied, secondary, -1), (k - n_above).clamp(min=1), bits=_KEY_BITS_UID,
                         group=group)
    chosen = above | (tied & (secondary >= t2))
    return torch.where(total <= k, cand, chosen)
