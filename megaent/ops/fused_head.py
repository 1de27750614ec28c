"""LM head + vocab-parallel log p(target) and entropy, without materialising [T, Vl] logits.

`fused_head_logprobs_entropy(hidden, weight, targets, group)` returns what
`vocab_parallel_logprobs_entropy(hidden @ weight.T, targets, group)` returns, but walks
the local vocab shard in chunks of `chunk_size` columns:

- forward: per chunk `x = hidden @ W_c.T / temperature` [T, C] in fp32, folded into a
  running (max m, S = sum exp(x - m), A = sum exp(x - m)(x - m), x[y]) with the online
  log-sum-exp rescaling (Milakov & Gimelshein 2018, "Online normalizer calculation for
  softmax"; the entropy accumulator A is rescaled the same way). Then the same 2
  all-reduces as the unfused op (MAX [T], SUM [T, 3]) merge the shards.
- saved for backward: hidden and weight (references, no copies), targets, and the
  per-token scalars logZ [T] and (only with `entropy_grad=True`) entropy [T].
- backward: per chunk, one matmul recomputes x, the softmax gradient is formed in place
  in that buffer (plus one [T, C] buffer for p when the entropy gradient is needed), then
  `grad_hidden += g @ W_c` and `grad_W_c = g.T @ hidden`. The partial `grad_hidden` of
  each vocab shard is completed by 1 SUM all-reduce of [T, H] over `group`: `hidden` is
  replicated over the TP group, so this op plays the role of megatron-core's
  `copy_to_tensor_model_parallel_region` and the caller must not reduce it again.

Peak extra memory is O(T * C) instead of O(T * Vl), plus the [Vl, H] weight gradient.
Columns at global index >= `vocab_size` (the TP padding of the LM head) are skipped,
so they get probability 0 and a zero weight gradient. Chunking idea as in Liger-Kernel's
fused linear cross-entropy and Apple's cut-cross-entropy (written here from the maths;
those chunk tokens, we chunk vocab columns so the all-reduce count stays 2).
"""
from __future__ import annotations

from typing import Optional

import torch

from megaent.ops.logprobs import Group, all_reduce_max, compute_dtype, finish_stats, group_rank_size
from megaent.ops.stats import global_sum


def _fold_chunk(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> None:
    """Fold chunk x [N, C] (consumed) into the running (m, S, A) [N], in place (online log-sum-exp)."""
    m_new = torch.maximum(m, x.max(dim=-1).values)
    rescale(m, s, a, m_new)
    z = x.sub_(m_new.unsqueeze(-1))  # [N, C], <= 0
    e = torch.exp(z)
    s.add_(e.sum(-1))
    a.add_(z.mul_(e).sum(-1))
    m.copy_(m_new)


def rescale(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, m_new: torch.Tensor) -> None:
    """Re-base S = sum exp(x - m) and A = sum exp(x - m)(x - m) from max m to m_new >= m, in place.

    exp(x - m') = f exp(x - m) with f = exp(m - m'), so S' = f S and A' = f (A + S (m - m')).
    Rows with nothing accumulated yet (S = 0, m = -inf) stay exactly 0.
    """
    f = torch.exp(m - m_new)
    shift = torch.where(s > 0, s * (m - m_new), torch.zeros_like(s))
    a.add_(shift).mul_(f)
    s.mul_(f)


class _FusedHeadLogprobsEntropy(torch.autograd.Function):
    """hidden [N, H], weight [Vl, H], targets [N] -> (logp [N], entropy [N])."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group: Group,
                chunk_size: int, temperature: float, vocab_start: int, n_valid: int,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n, cdt = hidden.shape[0], compute_dtype(hidden.dtype)
        m = torch.full((n,), float("-inf"), dtype=cdt, device=hidden.device)
        s, a, xt = (torch.zeros(n, dtype=cdt, device=hidden.device) for _ in range(3))
        local = targets - vocab_start  # [N] column of the target in this shard
        for c0 in range(0, n_valid, chunk_size):
            c1 = min(c0 + chunk_size, n_valid)
            x = torch.mm(hidden, weight[c0:c1].t()).to(cdt)  # [N, C]
            if temperature != 1.0:
                x.div_(temperature)
            hit = (local >= c0) & (local < c1)
            xt.add_(torch.where(hit, x.gather(-1, (local - c0).clamp(0, c1 - c0 - 1).unsqueeze(-1)).squeeze(-1),
                                torch.zeros_like(xt)))
            _fold_chunk(x, m, s, a)
        # Merge the shards: re-base every rank on the global max, then one fused SUM.
        m_glob = all_reduce_max(m.clone(), group)  # collective 1
        rescale(m, s, a, m_glob)
        in_shard = (local >= 0) & (local < n_valid)
        sums = torch.stack([s, a, torch.where(in_shard, xt - m_glob, torch.zeros_like(xt))], dim=-1)
        logp, entropy, logz = finish_stats(m_glob, global_sum(sums, group))  # collective 2
        ctx.save_for_backward(hidden, weight, targets, logz, entropy if entropy_grad else None)
        ctx.set_materialize_grads(False)
        ctx.cfg = (group, chunk_size, temperature, vocab_start, n_valid, entropy_grad)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor]):
        hidden, weight, targets, logz, entropy = ctx.saved_tensors
        group, chunk_size, temperature, vocab_start, n_valid, entropy_grad = ctx.cfg
        if g_ent is not None and not entropy_grad:
            raise RuntimeError("fused_head_logprobs_entropy(entropy_grad=False) stored nothing for the entropy "
                               "gradient, but the loss backpropagates through the entropy output; pass "
                               "entropy_grad=True or use entropy.detach() in the loss")
        cdt = compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        # grad_x = -(p / t) (g_logp + g_ent (log p + H)) + (g_logp / t) 1[v = y]
        ga = (torch.zeros(n, dtype=cdt, device=hidden.device) if g_logp is None else g_logp.to(cdt)) / temperature
        gb = None if g_ent is None else g_ent.to(cdt) / temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(n, hidden.shape[1], dtype=cdt, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # rows >= n_valid stay 0
        local = targets - vocab_start
        for c0 in range(0, n_valid, chunk_size):
            c1 = min(c0 + chunk_size, n_valid)
            w_c = weight[c0:c1]
            lp = torch.mm(hidden, w_c.t()).to(cdt)  # [N, C], recomputed logits
            if temperature != 1.0:
                lp.div_(temperature)
            lp.sub_(logz.unsqueeze(-1))  # log p
            if gb is None:
                g = lp.exp_().mul_(ga.unsqueeze(-1))
            else:
                p = torch.exp(lp)
                g = lp.add_(entropy.unsqueeze(-1)).mul_(gb.unsqueeze(-1)).add_(ga.unsqueeze(-1)).mul_(p)
            g.neg_()
            if g_logp is not None:
                hit = (local >= c0) & (local < c1)
                g.scatter_add_(-1, (local - c0).clamp(0, c1 - c0 - 1).unsqueeze(-1),
                               torch.where(hit, ga, torch.zeros_like(ga)).unsqueeze(-1))
            g = g.to(hidden.dtype)
            if need_h:
                if grad_h.dtype == g.dtype:
                    grad_h.addmm_(g, w_c)
                else:
                    grad_h.add_(torch.mm(g, w_c))
            if need_w:
                torch.mm(g.t(), hidden, out=grad_w[c0:c1])
        if need_h:
            grad_h = global_sum(grad_h, group).to(hidden.dtype)  # backward collective: SUM [N, H]
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_head_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    group: Group = None,
    *,
    chunk_size: int = 4096,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy of `softmax(hidden @ weight_full.T / temperature)`, chunked.

    Args:
        hidden: [..., T, H] final hidden states, replicated over `group`; any float dtype.
        weight: [Vl, H] this rank's LM-head shard (global rows `[rank * Vl, (rank + 1) * Vl)`).
        targets: [..., T] int64 global token ids.
        group: tensor-parallel group of the vocab shards (None = the whole head is here).
        chunk_size: vocab columns per chunk; extra memory ~ 2 * T * chunk_size fp32.
        temperature: logits are divided by it (as in the rollout sampler).
        vocab_size: true global vocab V; rows at global index >= V are padding and ignored.
        entropy_grad: False saves nothing for the entropy gradient (the entropy output is
            then for metrics only; backpropagating through it raises).

    Returns:
        (logp [..., T], entropy [..., T]) fp32 (fp64 for fp64 input), identical on all ranks.

    Collectives: forward 2 all-reduces on `group` (MAX [N], SUM [N, 3]); backward 1
    all-reduce (SUM of grad_hidden [N, H]); the weight gradient stays local.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: weight must be "
                         "[Vl, H] with the same H as hidden [..., T, H]")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden shape {tuple(hidden.shape)} and targets shape {tuple(targets.shape)} disagree: "
                         "hidden must be targets.shape + [H]")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be a positive number of vocab columns (e.g. 4096)")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (1.0 = plain softmax)")
    rank, size = group_rank_size(group)
    vl = weight.shape[0]
    if vocab_size is not None and not 0 < vocab_size <= size * vl:
        raise ValueError(f"vocab_size={vocab_size}: must be in (0, {size * vl}] (TP size {size} x shard rows {vl})")
    vocab_start = rank * vl
    n_valid = vl if vocab_size is None else max(0, min(vl, vocab_size - vocab_start))
    lead = targets.shape
    logp, entropy = _FusedHeadLogprobsEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(), group, int(chunk_size),
        float(temperature), vocab_start, n_valid, bool(entropy_grad))
    return logp.reshape(lead), entropy.reshape(lead)
