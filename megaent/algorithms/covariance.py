"""Per-token covariance and the Clip-Cov / KL-Cov token selections (Cui et al. 2025, arXiv 2505.22617).

The entropy change of one policy-gradient step is about -Cov(log pi(a), A(a)) (paper Eq. for the natural
policy gradient); a few tokens carry most of it. Each token's centred contribution is

    c_i = (A_i - mean A) * (logp_i - mean logp),   means over the valid tokens of ALL ranks of `group`

which is what the paper's verl code computes per micro-batch (`compute_policy_loss_clip_cov`/`_kl_cov`);
megaent computes it over the whole mini-batch when the trainer passes it whole (cov_scope=global).

Split invariance. The means are accumulated in fp64 and c_i rounded to fp32 once, so the same token gets
bit-identical c_i however the batch is split. The selections use `global_topk_mask` (exact, no host sync)
and a per-token random priority that is a counter-based hash of (seed, token_uid): a token's chance of
being picked depends on its uid and the seed only, never on its rank or micro-batch. `token_uid` is an
int64 id >= 0, unique over the mini-batch (e.g. sample_uid * S_max + position); without it the local flat
index is used, which is fine for a single process / per-micro-batch scope only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megaent.ops.topk import INT63_MAX, global_topk_mask, ordered_key_f32
from megaent.ops.metrics import top_fraction_mean
from megaent.ops.stats import global_sum, masked_mean

Group = Optional[dist.ProcessGroup]

COV_TOP_FRACTION = 2e-4
"""The paper's "top 0.02%" of tokens by covariance (mean about 5.65 vs 0.003 overall)."""

_M32 = 0xFFFFFFFF


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     group: Group = None) -> torch.Tensor:
    """Centred per-token covariance c_i over the valid tokens of all ranks.

    logprobs, advantages: [B, S] (any shape) any float dtype; mask: [B, S] bool/0-1. Returns cov [B, S]
    fp32, detached, 0 at invalid tokens; its masked mean is the population Cov(logp, A). Means in fp64.
    Collectives: 1 all-reduce of an fp64 3-vector on `group`.
    """
    m = mask.to(torch.bool)
    a = advantages.detach().to(torch.float64)
    lp = logprobs.detach().to(torch.float64)
    local = torch.stack([torch.where(m, a, 0.0).sum(), torch.where(m, lp, 0.0).sum(), m.sum().to(torch.float64)])
    tot = global_sum(local, group)
    n = tot[2].clamp(min=1.0)
    cov = (a - tot[0] / n) * (lp - tot[1] / n)
    return torch.where(m, cov, 0.0).to(torch.float32)


def covariance_stats(cov: torch.Tensor, mask: torch.Tensor, group: Group = None) -> dict[str, torch.Tensor]:
    """{"cov_mean", "cov_top_0.02pct"}: mean c_i and mean of the top 0.02% c_i over all ranks (0-d fp32)."""
    return {"cov_mean": masked_mean(cov, mask, group),
            "cov_top_0.02pct": top_fraction_mean(cov, mask, COV_TOP_FRACTION, group)}


# --- counter-based random priority -----------------------------------------------------------------------
# lowbias32 integer hash (Chris Wellons, "hash-prospector", 2020), evaluated on int64 tensors holding 32-bit
# values; the 32x32-bit products are split into 16-bit halves so no int64 product ever overflows (signed
# overflow wrap-around is not something to rely on across devices).

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32), without int64 overflow."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def token_priority(token_uid: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Random priority in [0, 2^32) of each token: mix32(lo32(uid) ^ mix32(hi32(uid) ^ mix32(seed))).

    token_uid: int64 >= 0, any shape; seed: 0-d int64 in [0, 2^31). A pure function of (seed, uid).
    """
    s = _mix32(seed.to(token_uid.device, torch.int64) & _M32)
    return _mix32((token_uid & _M32) ^ _mix32((token_uid >> 32) ^ s))


def draw_seed(generator: torch.Generator) -> torch.Tensor:
    """One draw from `generator`: torch.randint(2**31, (), generator=generator) as a 0-d int64 (no sync)."""
    return torch.randint(1 << 31, (), generator=generator, device=generator.device, dtype=torch.int64)


def _uids(token_uid: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if token_uid is None:
        return torch.arange(like.numel(), device=like.device).view(like.shape)
    if token_uid.dtype != torch.int64 or token_uid.shape != like.shape:
        raise ValueError(f"token_uid: dtype {token_uid.dtype}, shape {tuple(token_uid.shape)}; expected int64 "
                         f"of shape {tuple(like.shape)} (e.g. sample_uid * S_max + position)")
    return token_uid


def _k_of(ratio: float, mask: torch.Tensor, group: Group) -> torch.Tensor:
    """max(1, int(ratio * N_valid_global)) as a 0-d int64 (fp64 product = Python's float product)."""
    n = global_sum(mask.to(torch.bool).sum(), group)
    return torch.floor(n.to(torch.float64) * ratio).to(torch.int64).clamp(min=1)


def select_clip_cov(cov: torch.Tensor, mask: torch.Tensor, ppo_clipped: torch.Tensor, *, clip_cov_ratio: float,
                    clip_cov_lb: float, clip_cov_ub: float, generator: torch.Generator,
                    token_uid: Optional[torch.Tensor] = None, group: Group = None) -> torch.Tensor:
    """Clip-Cov selection: which tokens get their gradient detached.

    Candidates: valid tokens not already PPO-clipped with clip_cov_lb < c_i < clip_cov_ub (strict). Picks
    max(1, int(clip_cov_ratio * N_valid)) of them (N_valid over all ranks) uniformly at random, or all
    candidates when fewer: the ones with the smallest `token_priority(uid, seed)` (ties by smaller uid),
    seed = `draw_seed(generator)`; all ranks must pass equally seeded generators.
    cov, mask, ppo_clipped, token_uid: [B, S] (any shape). Returns bool [B, S].
    Collectives: 15 all-reduces on `group`; no host sync.
    """
    uid = _uids(token_uid, cov)
    m = mask.to(torch.bool)
    k = _k_of(clip_cov_ratio, m, group)
    cand = m & ~ppo_clipped.to(torch.bool) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    prio = token_priority(uid, draw_seed(generator))
    return global_topk_mask(_M32 - prio, INT63_MAX - uid, cand, k, group=group)


def select_kl_cov(cov: torch.Tensor, mask: torch.Tensor, *, kl_cov_ratio: float,
                  token_uid: Optional[torch.Tensor] = None, group: Group = None) -> torch.Tensor:
    """KL-Cov selection: the top max(1, int(kl_cov_ratio * N_valid)) valid tokens by c_i over all ranks.

    Ties in c_i go to the smaller uid, so the set is deterministic and split-invariant.
    cov, mask, token_uid: [B, S] (any shape). Returns bool [B, S]. Collectives: 15 all-reduces on `group`.
    """
    uid = _uids(token_uid, cov)
    m = mask.to(torch.bool)
    k = _k_of(kl_cov_ratio, m, group)
    return global_topk_mask(ordered_key_f32(cov), INT63_MAX - uid, m, k, group=group)
