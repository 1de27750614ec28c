"""The exact first-order entropy change of one update, vocab-parallel and chunked (Cui et al. 2025, Sec. 3).

For a softmax policy pi = softmax(z) and a logit change dz = z' - z at one state, the paper's Lemma 1 gives

    H(pi') - H(pi) = -Cov_{a~pi}(log pi(a), dz(a)) + O(|dz|^2)
    Cov = sum_a pi log pi dz - (sum_a pi log pi)(sum_a pi dz)

The op evaluates, per sampled position, that covariance at pi = pi_old and both exact entropies, from the
final hidden states and the LM-head shards before and after an update:

    z0 = h0 @ W0.T / temperature,  z1 = h1 @ W1.T / temperature,  dz = z1 - z0       (fp32 / fp64)

Inputs of any dtype are upcast (fp32, or fp64 for fp64) before the matmuls, and dz is computed directly as
(h1 - h0) @ W1.T + h0 @ (W1 - W0).T, so the tiny per-step change of a bf16 model is not lost in the rounding
of two large logits (3 matmuls per chunk; 2 when hidden or head is passed unchanged, as the same tensor).

Because Cov is invariant to adding a constant to log pi, Cov = Cov_pi(z0 - m0, dz) for any shift m0, so no
log-partition is needed inside the covariance. Each rank walks its vocab rows in chunks of `chunk_size`
and folds every chunk into running per-position sums relative to a running max (online log-sum-exp,
Milakov & Gimelshein 2018; the same fold as `megaent.ops.fused_head`, extended by two columns):

    S0 = sum e0,  A0 = sum e0 x,  B = sum e0 dz,  C = sum e0 x dz     e0 = exp(z0 - m0), x = z0 - m0
    S1 = sum e1,  A1 = sum e1 (z1 - m1)                                e1 = exp(z1 - m1)
    D = sum e0 dz^2,  E = sum e0 x dz^2                                (the second-order term)

then re-bases the shards on the global maxima and sums them:

    H_old = log S0 - A0 / S0,  H_new = log S1 - A1 / S1,  Cov = C / S0 - (A0 / S0)(B / S0)

The second-order term of the expansion is also returned: with g = dz - E_pi dz,
d^2 H along dz = -(Var_pi(dz) + Cov_pi(log pi, g^2)), so H_new - H_old = -Cov + second + O(|dz|^3) with
second = -1/2 (Var_pi(dz) + Cov_pi(log pi, g^2)). Large steps (many Adam updates at a large lr) make it
comparable to the first-order term; see docs/entropy-dynamics.md.

Collectives: 2 all-reduces on `tp_group` (MAX [N, 2], SUM [N, 8]); nothing on any other group. Rows at
global index >= `vocab_size` (TP padding of the head) are never read, whatever they hold. Extra memory
~ 6 * N * chunk_size in the compute dtype, plus
the [N, H] upcast hidden states; never [N, Vl]. No autograd.

`sample_positions` picks the positions: hidden states are replicated over the TP group, so every TP rank
must pick the same ones (equally seeded generators); DP ranks pick from their own tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megaent.ops.logprobs import Group, all_reduce_max, compute_dtype, group_rank_size
from megaent.ops.stats import global_sum


class EntropyChange(NamedTuple):
    """Per-position results of `entropy_change`, each [N] fp32 (fp64 for fp64 inputs)."""

    cov: torch.Tensor
    """Cov_{a~pi_old}(log pi_old(a), z1(a) - z0(a)); predicted dH = -cov (paper Lemma 1)."""
    entropy_old: torch.Tensor
    """Exact H(pi_old) in nats."""
    entropy_new: torch.Tensor
    """Exact H(pi_new) in nats."""
    second: torch.Tensor
    """The second-order term of H(pi_new) - H(pi_old) along dz: -1/2 (Var_pi(dz) + Cov_pi(log pi, g^2)),
    g = dz - E_pi dz, so H_new - H_old = -cov + second + O(|dz|^3)."""


def sample_positions(mask: torch.Tensor, budget: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `budget` valid positions of `mask`, uniformly without replacement, with no host sync.

    mask: [B, S] (any shape) bool/0-1. generator: on mask's device, seeded from (seed, step, dp rank), the
    same on every TP rank. Returns (index [N] int64 into mask.flatten(), ascending; valid [N] bool) with
    N = min(budget, mask.numel()): fixed size, so when fewer than N positions are valid the tail entries
    are invalid ones, flagged False in `valid` (mask them out of every mean).
    """
    if budget <= 0:
        raise ValueError(f"budget={budget}: must be a positive number of positions (e.g. 4096)")
    flat = mask.reshape(-1).to(torch.bool)
    prio = torch.rand(flat.numel(), generator=generator, device=generator.device).to(flat.device)
    prio = torch.where(flat, prio, torch.full_like(prio, 2.0))  # invalid positions sort after every valid one
    n = min(int(budget), flat.numel())
    idx = torch.topk(prio, n, largest=False, sorted=False).indices.sort().values
    return idx, flat[idx]


def _rebase(m: torch.Tensor, m_new: torch.Tensor, s: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]
            ) -> None:
    """Move sums relative to max m [N] onto max m_new >= m, in place.

    Every sum is sum e (.) with e = exp(z - m); exp(z - m') = f exp(z - m), f = exp(m - m'). A sum over
    (z - m) picks up its companion times (m - m'): for each pair (u, v) with u = sum e w and
    v = sum e (z - m) w, v' = f (v + u (m - m')) and u' = f u. `s` is the pair's S (sum e): rows with
    nothing accumulated yet (S = 0, m = -inf) stay exactly 0.
    """
    f = torch.exp(m - m_new)
    delta = torch.where(s > 0, m - m_new, torch.zeros_like(m))  # -inf - finite would poison the shift
    for u, v in pairs:
        v.add_(u * delta).mul_(f)
    for u, _ in pairs:
        u.mul_(f)


def _rescale(m: torch.Tensor, m_new: torch.Tensor, acc: torch.Tensor) -> None:
    """Re-base acc [N, 8] = (S0, A0, B, C, S1, A1, D, E) from maxima m [N, 2] (old, new policy) to m_new [N, 2]."""
    s0, a0, b, c, s1, a1, d, e = acc.unbind(-1)  # views: updated in place
    _rebase(m[:, 0], m_new[:, 0], s0, (s0, a0), (b, c), (d, e))
    _rebase(m[:, 1], m_new[:, 1], s1, (s1, a1))


def _fold(z0: torch.Tensor, dz: torch.Tensor, m: torch.Tensor, acc: torch.Tensor) -> None:
    """Fold one chunk's old logits z0 and change dz [N, C] (z0 consumed) into the running maxima m [N, 2]
    and sums acc [N, 8], in place."""
    z1 = z0 + dz  # [N, C]
    m_new = torch.maximum(m, torch.stack([z0.max(-1).values, z1.max(-1).values], dim=-1))
    _rescale(m, m_new, acc)
    x0 = z0.sub_(m_new[:, :1])  # [N, C], <= 0
    e0 = torch.exp(x0)
    acc[:, 0].add_(e0.sum(-1))
    t = e0 * x0
    acc[:, 1].add_(t.sum(-1))
    acc[:, 3].add_(t.mul_(dz).sum(-1))
    acc[:, 7].add_(t.mul_(dz).sum(-1))
    acc[:, 2].add_(e0.mul_(dz).sum(-1))
    acc[:, 6].add_(e0.mul_(dz).sum(-1))
    x1 = z1.sub_(m_new[:, 1:])
    e1 = torch.exp(x1)
    acc[:, 4].add_(e1.sum(-1))
    acc[:, 5].add_(e1.mul_(x1).sum(-1))
    m.copy_(m_new)


def _chunk_logits(h0: torch.Tensor, dh: Optional[torch.Tensor], w0: torch.Tensor, w1: Optional[torch.Tensor],
                  cdt: torch.dtype, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, dz) [N, C] in cdt for one chunk of head rows; dh = h1 - h0 (None: unchanged), w1 None: unchanged.

    dz is formed as dh @ W1.T + h0 @ (W1 - W0).T, never as z1 - z0: its rounding error then scales with |dz|,
    not with |z| (a bf16 or TF32 z1 - z0 would bury a 1e-3 change under 1e-2 of rounding)."""
    w0c = w0.to(cdt)
    z0 = torch.mm(h0, w0c.t())
    dz = torch.zeros_like(z0)
    if dh is not None:
        dz.addmm_(dh, (w0c if w1 is None else w1.to(cdt)).t())
    if w1 is not None:
        dz.addmm_(h0, (w1.to(cdt) - w0c).t())
    if inv_t != 1.0:
        z0.mul_(inv_t)
        dz.mul_(inv_t)
    return z0, dz


@torch.no_grad()
def entropy_change(
    hidden_old: torch.Tensor,
    hidden_new: torch.Tensor,
    weight_old: torch.Tensor,
    weight_new: torch.Tensor,
    tp_group: Group = None,
    *,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> EntropyChange:
    """Per-position Cov_{pi_old}(log pi_old, dz), H_old and H_new of an update (see the module docstring).

    Args:
        hidden_old, hidden_new: [N, H] final hidden states (after the final norm) at the same N positions
            before and after the update; any float dtype; replicated over `tp_group`. Pass the same tensor
            twice to measure a head-only change.
        weight_old, weight_new: [Vl, H] this rank's LM-head shard before and after (same tensor twice when
            the head is frozen or tied and unchanged).
        tp_group: the tensor-parallel group holding the vocab shards (None = the whole head is here).
        vocab_start: global id of local row 0; default rank_in_group * Vl.
        vocab_size: true global vocab V; rows at global index >= V are padding, never read. Default: all.
        temperature: logits are divided by it (the rollout sampler's; pi is the sampling policy).
        chunk_size: vocab rows per chunk; extra memory ~6 * N * chunk_size in the compute dtype.

    Returns:
        EntropyChange(cov, entropy_old, entropy_new), each [N] fp32 (fp64 for fp64 hidden), identical on
        all ranks of `tp_group`, on the inputs' device.

    Collectives: 2 all-reduces on `tp_group` (MAX [N, 2], SUM [N, 8]). No host sync.
    """
    n, d = hidden_old.shape
    if hidden_new.shape != (n, d) or weight_old.dim() != 2 or weight_old.shape[1] != d \
            or weight_new.shape != weight_old.shape:
        raise ValueError(f"entropy_change: hidden_old {tuple(hidden_old.shape)}, hidden_new "
                         f"{tuple(hidden_new.shape)}, weight_old {tuple(weight_old.shape)}, weight_new "
                         f"{tuple(weight_new.shape)}: expected hidden [N, H] twice and weights [Vl, H] twice")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be a positive number of vocab rows (e.g. 4096)")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (1.0 = plain softmax)")
    rank, size = group_rank_size(tp_group)
    vl = weight_old.shape[0]
    if vocab_start is None:
        vocab_start = rank * vl
    if vocab_size is not None and not 0 < vocab_size <= size * vl:
        raise ValueError(f"vocab_size={vocab_size}: must be in (0, {size * vl}] (TP size {size} x shard rows {vl})")
    n_valid = vl if vocab_size is None else max(0, min(vl, vocab_size - vocab_start))
    cdt, dev = compute_dtype(hidden_old.dtype), hidden_old.device
    h0 = hidden_old.to(cdt)
    dh = None if hidden_new is hidden_old else hidden_new.to(cdt) - h0  # [N, H]
    m = torch.full((n, 2), float("-inf"), dtype=cdt, device=dev)
    acc = torch.zeros(n, 8, dtype=cdt, device=dev)
    for c0 in range(0, n_valid, chunk_size):
        c1 = min(c0 + chunk_size, n_valid)
        z0, dz = _chunk_logits(h0, dh, weight_old[c0:c1], None if weight_new is weight_old else weight_new[c0:c1],
                               cdt, 1.0 / temperature)
        _fold(z0, dz, m, acc)
    m_glob = all_reduce_max(m.clone(), tp_group)  # collective 1
    _rescale(m, m_glob, acc)
    s0, a0, b, c, s1, a1, d, e = global_sum(acc, tp_group).unbind(-1)  # collective 2
    mean_x, mean_dz = a0 / s0, b / s0
    var_dz = d / s0 - mean_dz * mean_dz
    # E[x g^2] with g = dz - E dz, from the raw moments; Cov(x, g^2) = E[x g^2] - E[x] Var(dz)
    x_g2 = e / s0 - 2 * mean_dz * (c / s0) + mean_dz * mean_dz * mean_x
    return EntropyChange(cov=c / s0 - mean_x * mean_dz, entropy_old=torch.log(s0) - mean_x,
                         entropy_new=torch.log(s1) - a1 / s1,
                         second=-0.5 * (var_dz + x_g2 - mean_x * var_dz))
