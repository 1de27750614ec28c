"""Exact log p(target) and entropy over a vocabulary sharded across a tensor-parallel group.

Rank r of `group` holds logits for global vocab columns `[vocab_start, vocab_start + Vl)`
(default `vocab_start = r * Vl`, megatron-core's `VocabParallelEmbedding` / column-parallel
LM-head layout). Both outputs are the values a single process would get from the full
`log_softmax(logits / temperature)`:

    logp[t] = x[t, y_t] - logZ[t]              x = logits / temperature (fp32)
    H[t]    = logZ[t] - sum_v p[t, v] x[t, v]  logZ = m + log S,  S = sum_v exp(x - m)

Collectives (forward): 2 all-reduces on `group`: MAX of the per-token local max `m` [N],
then one fused SUM of `[S, sum exp(x - m) (x - m), x[y] - m]` stacked as [N, 3].
Backward: none. Each rank owns the gradient of its own vocab columns, and the
saved per-token scalars (logZ, H) are already global:

    d logp / d x_v = 1[v = y] - p_v
    d H    / d x_v = -p_v (log p_v + H)

The same split into (local stats -> all-reduce -> finish) is used by the fused LM
head in `megaent.ops.fused_head`. Idea after megatron-core's
`tensor_parallel/cross_entropy.py` (vocab-parallel CE, max + sum all-reduces, local
backward) and torchtitan's loss; the entropy terms and the merged SUM are ours.

Padded vocab entries hold `-inf` (or `finfo.min`): exp gives exactly 0, and every
`0 * log 0` product is evaluated on a clamped log-probability, so neither value nor
gradient can become NaN. Targets outside `[0, V)` give a finite but meaningless
log-prob (mask those tokens in the loss).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megaent.ops.stats import Group, global_sum

# Any log-probability below this has exp() == 0 exactly in fp32 (and fp64 beyond 745), so
# clamping to it changes no probability but keeps `p * log p` products finite.
LOGP_FLOOR = -1.0e4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (so gradcheck can run in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_rank_size(group: Group) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when `group` is None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """In-place MAX all-reduce over `group` (no-op for a single process); returns `x`."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def finish_stats(m: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global per-token stats -> (logp, entropy, logZ), all [N].

    m [N]: global max of x. sums [N, 3] (already summed over the group):
    S = sum exp(x - m), A = sum exp(x - m) (x - m), xt = x[y] - m.
    """
    s, a, xt = sums.unbind(-1)
    log_s = torch.log(s)
    logp = xt - log_s
    entropy = log_s - a / s
    return logp, entropy, m + log_s


def _local_stats(x: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """x [N, Vl] (compute dtype), targets [N] global ids, m [N] global max -> [N, 3] local sums."""
    z = x - m.unsqueeze(-1)  # [N, Vl]; -inf for padded columns
    z.clamp_(min=LOGP_FLOOR)  # exp unchanged (0), but 0 * z stays 0
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < x.shape[-1])
    zt = z.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    zt = torch.where(in_shard, zt, torch.zeros_like(zt))
    e = torch.exp(z)  # [N, Vl]
    s = e.sum(-1)
    a = z.mul_(e).sum(-1)
    return torch.stack([s, a, zt], dim=-1)


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """logits [N, Vl] -> (logp [N], entropy [N]); see the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Group, temperature: float,
                vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        cdt = compute_dtype(logits.dtype)
        x = logits.to(cdt)
        if temperature != 1.0:
            x = x / temperature
        m = all_reduce_max(x.max(dim=-1).values, group)  # collective 1
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all-padded rows stay NaN-free here
        sums = global_sum(_local_stats(x, targets, m, vocab_start), group)  # collective 2
        logp, entropy, logz = finish_stats(m, sums)
        ctx.save_for_backward(logits, targets, logz, entropy)
        ctx.set_materialize_grads(False)  # an unused output arrives as None: skip its term
        ctx.temperature = temperature
        ctx.vocab_start = vocab_start
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor]):
        logits, targets, logz, entropy = ctx.saved_tensors
        cdt = compute_dtype(logits.dtype)
        inv_t = 1.0 / ctx.temperature
        # lp = log p over the local columns, one [N, Vl] buffer reused for the gradient.
        lp = logits.to(cdt, copy=True)
        if ctx.temperature != 1.0:
            lp.div_(ctx.temperature)  # the forward's exact rounding
        lp.sub_(logz.unsqueeze(-1)).clamp_(min=LOGP_FLOOR)
        # grad_x = -p * (g_logp + g_ent * (lp + H)) + g_logp * 1[v = y], all scaled by 1/temperature.
        a = torch.zeros_like(logz) if g_logp is None else g_logp.to(cdt)
        if g_ent is None:
            grad = lp.exp_().mul_(a.unsqueeze(-1))
        else:
            p = torch.exp(lp)
            grad = lp.add_(entropy.unsqueeze(-1)).mul_(g_ent.to(cdt).unsqueeze(-1)).add_(a.unsqueeze(-1)).mul_(p)
        grad.mul_(-inv_t)
        if g_logp is not None:
            local = targets - ctx.vocab_start
            in_shard = (local >= 0) & (local < grad.shape[-1])
            add = torch.where(in_shard, a * inv_t, torch.zeros_like(a))
            grad.scatter_add_(-1, local.clamp(0, grad.shape[-1] - 1).unsqueeze(-1), add.unsqueeze(-1))
        return grad.to(logits.dtype), None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: Group = None,
    *,
    temperature: float = 1.0,
    vocab_start: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(target) and entropy over the full (sharded) vocabulary.

    Args:
        logits: [..., T, Vl] local vocab shard, any float dtype (bf16/fp16/fp32/fp64).
            Padded vocab columns must hold -inf or a very negative value (`finfo.min`).
        targets: [..., T] int64 global token ids.
        group: tensor-parallel group holding the vocab shards (None = full vocab here).
        temperature: logits are divided by it (same as the rollout sampler).
        vocab_start: global id of local column 0; default `rank_in_group * Vl`.

    Returns:
        (logp [..., T], entropy [..., T]), fp32 (fp64 for fp64 input), identical on all
        ranks of `group`; both differentiable w.r.t. `logits`.

    Collectives: forward 2 all-reduces on `group` (MAX [N], SUM [N, 3]); backward none.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (1.0 = plain softmax)")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} and targets shape {tuple(targets.shape)} "
                         "disagree: logits must be targets.shape + [Vl]")
    if vocab_start is None:
        vocab_start = group_rank_size(group)[0] * logits.shape[-1]
    lead = targets.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).long()
    logp, entropy = _VocabParallelLogprobsEntropy.apply(flat_logits, flat_targets, group, float(temperature),
                                                         int(vocab_start))
    return logp.reshape(lead), entropy.reshape(lead)
