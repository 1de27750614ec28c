"""Policy objectives: PPO (clip-higher, dual-clip), Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617).

Per-token losses, with ratio = exp(logp - logp_old) and A the advantage:
  ppo       max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))    (Schulman et al. 2017; separate
            eps_low/eps_high is DAPO's clip-higher, Yu et al. 2025); with dual_clip_c = c, tokens with A < 0
            are further bounded by min(., -A * c) (dual-clip, Ye et al. 2020).
  clip_cov  the ppo loss, times 0 on the Clip-Cov-selected tokens (their gradient is stopped; they still
            count in the denominator). Paper Eq. "Clip-Cov"; verl `compute_policy_loss_clip_cov`.
  kl_cov    -A * ratio on every token (no clipping), plus kl_cov_coef * |logp - logp_old| on the KL-Cov-
            selected tokens. Paper Eq. "KL-Cov"; verl `compute_policy_loss_kl_cov`.
Optional terms on every valid token: -entropy_coef * H (entropy bonus) and kl_coef * KL(pi || pi_ref).
All are aggregated with `aggregate` against a global denominator (see aggregation.py).

Selection scope. `selected` is a mask precomputed by `select_tokens` on this rank's whole mini-batch
over the DP group (cov_scope=global). When it is None, the selection is computed here from the tensors
given over `group`, i.e. per micro-batch when the trainer passes group=None (cov_scope=micro_batch,
the verl behaviour). Covariance uses the log-probs passed in (the current policy, as verl does; at the
first update after a rollout they equal old_logprobs).

No `.item()`, no host sync: stats are 0-d tensors the trainer reads once per step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megaent.algorithms.aggregation import aggregate, loss_denominator
from megaent.algorithms.covariance import covariance_stats, select_clip_cov, select_kl_cov, token_covariance
from megaent.algorithms.kl import KL_ESTIMATORS
from megaent.config.schema import LossConfig
from megaent.ops.stats import global_sum

Group = Optional[dist.ProcessGroup]
POLICY_LOSSES = ("ppo", "clip_cov", "kl_cov")


def ppo_token_loss(ratio: torch.Tensor, advantages: torch.Tensor, *, clip_ratio_low: float, clip_ratio_high: float,
                   dual_clip_c: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token: ([B, S] fp32 loss, [B, S] bool "clipped": the gradient is cut).

    "clipped" means the clipped branch is active (-A * clip(ratio) > -A * ratio), or dual-clip binds.
    """
    unclipped = -advantages * ratio
    clipped_branch = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(unclipped, clipped_branch)
    clipped = clipped_branch > unclipped
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        clipped = clipped | dual
    return loss, clipped


def _prepare(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask bool, logp, log-ratio, advantages), fp32, zeroed at invalid tokens with `where` so padding
    garbage (even inf/NaN) never reaches the loss, the stats or the gradient."""
    m = mask.to(torch.bool)
    lp = torch.where(m, logprobs.to(torch.float32), 0.0)
    log_ratio = lp - torch.where(m, old_logprobs.to(torch.float32), 0.0)
    adv = torch.where(m, advantages.to(torch.float32), 0.0)
    return m, lp, log_ratio, adv


def select_tokens(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  cfg: LossConfig, group: Group = None, generator: Optional[torch.Generator] = None, *,
                  token_uid: Optional[torch.Tensor] = None, cov: Optional[torch.Tensor] = None
                  ) -> Optional[torch.Tensor]:
    """The Clip-Cov or KL-Cov selection of `cfg.policy_loss` (None for ppo) over `group`.

    All tensors [B, S] (this rank's whole mini-batch for cov_scope=global; any shape works). `generator`
    (clip_cov): equally seeded on every rank, e.g. from (trainer.seed, step, mini-batch). `cov`: a
    precomputed `token_covariance` over the same tokens and group. Returns bool [B, S] or None.
    Collectives: 16 small all-reduces on `group`; no host sync.
    """
    if cfg.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"algorithm.policy_loss={cfg.policy_loss!r}: must be one of {', '.join(POLICY_LOSSES)}")
    if cfg.policy_loss == "ppo":
        return None
    m, lp, log_ratio, adv = _prepare(logprobs, old_logprobs, advantages, mask)
    if cov is None:
        cov = token_covariance(lp, adv, m, group)
    if cfg.policy_loss == "kl_cov":
        return select_kl_cov(cov, m, kl_cov_ratio=cfg.kl_cov_ratio, token_uid=token_uid, group=group)
    if generator is None:
        raise ValueError("algorithm.policy_loss='clip_cov' needs a torch.Generator seeded equally on all ranks "
                         "(e.g. from trainer.seed and the step); pass generator=")
    _, clipped = ppo_token_loss(torch.exp(log_ratio.detach()), adv, clip_ratio_low=cfg.clip_ratio_low,
                                clip_ratio_high=cfg.clip_ratio_high, dual_clip_c=cfg.dual_clip_c)
    return select_clip_cov(cov, m, clipped & m, clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb,
                           clip_cov_ub=cfg.clip_cov_ub, generator=generator, token_uid=token_uid, group=group)


def _token_objective(log_ratio: torch.Tensor, adv: torch.Tensor, selected: Optional[torch.Tensor],
                     cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    ratio = torch.exp(log_ratio)
    ppo, clipped = ppo_token_loss(ratio, adv, clip_ratio_low=cfg.clip_ratio_low,
                                  clip_ratio_high=cfg.clip_ratio_high, dual_clip_c=cfg.dual_clip_c)
    if cfg.policy_loss == "ppo":
        return ppo, clipped
    if cfg.policy_loss == "clip_cov":
        return ppo * (~selected).to(ppo.dtype), clipped  # x 0 on selected: zero gradient, still counted
    penalty = cfg.kl_cov_coef * log_ratio.abs()
    return -adv * ratio + torch.where(selected, penalty, torch.zeros_like(penalty)), clipped


def _check_shapes(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, expected the mask's "
                             f"{tuple(mask.shape)} ([B, S])")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: LossConfig, group: Group = None, generator: Optional[torch.Generator] = None, *,
                selected: Optional[torch.Tensor] = None, token_uid: Optional[torch.Tensor] = None,
                denominator: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                ref_logprobs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the policy loss of `cfg.policy_loss`, and its stats.

    logprobs [B, S] (differentiable; current policy), old_logprobs [B, S], advantages [B, S] (per token,
    e.g. `broadcast_to_tokens`), mask [B, S] bool/0-1; entropy [B, S] and ref_logprobs [B, S] optional
    (needed when entropy_coef / kl_coef are non-zero). `selected` bool [B, S]: precomputed Clip-Cov/KL-Cov
    selection (else computed here over `group`; clip_cov then needs `generator`). `denominator`: the global
    `loss_denominator` of the mini-batch (else computed from `mask` over `group`).

    Returns (loss 0-d fp32, stats). Summing loss over micro-batches and DP ranks gives the mini-batch loss.
    Stats (0-d fp32, detached, masked means over the valid tokens given, across `group`): pg_clipfrac,
    approx_kl (mean logp_old - logp), cov_mean, cov_top_0.02pct, selected_frac (clip_cov, kl_cov),
    entropy_mean (entropy given), kl_ref (ref_logprobs given).
    Collectives on `group`: 8 small all-reduces (+1 for the denominator, +15 for an inner selection).
    Edge cases: no valid token anywhere -> loss 0, stats 0; zero advantages -> c = 0, Clip-Cov selects
    nothing (c must exceed clip_cov_lb > 0), KL-Cov still selects its k tokens (ties -> smallest uid).
    """
    if cfg.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"algorithm.policy_loss={cfg.policy_loss!r}: must be one of {', '.join(POLICY_LOSSES)}")
    _check_shapes(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, selected=selected,
                  entropy=entropy, ref_logprobs=ref_logprobs, token_uid=token_uid)
    if cfg.entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"algorithm.entropy_coef={cfg.entropy_coef}: pass entropy= (or set it to 0)")
    if cfg.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"algorithm.kl_coef={cfg.kl_coef}: pass ref_logprobs= (or set it to 0)")
    m, lp, log_ratio, adv = _prepare(logprobs, old_logprobs, advantages, mask)
    cov = token_covariance(lp, adv, m, group)
    if cfg.policy_loss != "ppo" and selected is None:
        selected = select_tokens(logprobs, old_logprobs, adv, m, cfg, group, generator, token_uid=token_uid, cov=cov)
    if selected is not None:
        selected = selected.to(torch.bool) & m
    loss_tok, clipped = _token_objective(log_ratio, adv, selected, cfg)

    means: dict[str, torch.Tensor] = {"pg_clipfrac": clipped.to(torch.float32), "approx_kl": -log_ratio.detach()}
    if selected is not None:
        means["selected_frac"] = selected.to(torch.float32)
    if entropy is not None:
        ent = torch.where(m, entropy.to(torch.float32), 0.0)
        loss_tok = loss_tok - cfg.entropy_coef * ent
        means["entropy_mean"] = ent.detach()
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS[cfg.kl_estimator](lp, torch.where(m, ref_logprobs.to(torch.float32), 0.0))
        loss_tok = loss_tok + cfg.kl_coef * kl
        means["kl_ref"] = kl.detach()

    if denominator is None:
        denominator = loss_denominator(m, cfg, group)
    loss = aggregate(loss_tok, m, cfg.loss_agg, denominator)
    stats = _masked_means(means, m, group)
    stats.update(covariance_stats(cov, m, group))
    return loss, stats


def _masked_means(values: dict[str, torch.Tensor], mask: torch.Tensor, group: Group) -> dict[str, torch.Tensor]:
    """Masked means of several [B, S] tensors over `group` with one all-reduce (0 when nothing is valid)."""
    local = torch.stack([torch.where(mask, v.detach().to(torch.float32), 0.0).sum() for v in values.values()]
                        + [mask.sum().to(torch.float32)])
    tot = global_sum(local, group)
    return {k: tot[i] / tot[-1].clamp(min=1.0) for i, k in enumerate(values)}
