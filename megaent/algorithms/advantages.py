"""Outcome-reward advantage estimators over groups of G samples per prompt.

Rewards come as [N, G] (N prompts, G samples each) or flat [N*G] with `group_size=G` (sample n*G + g is
prompt n's g-th sample). Each estimator returns one advantage per sample; `broadcast_to_tokens` spreads
it over the response tokens. They run on the whole rollout batch in one process (the controller), before
the batch is scattered to ranks, so "batch" statistics below are exact.

  grpo          (r - mean_g) / (std_g + eps), std unbiased (torch.std), or without the division when
                norm_by_std=False. DeepSeekMath, Shao et al. 2024 (arXiv 2402.03300).
  drgrpo        r - mean_g: no std division. Dr.GRPO, Liu et al. 2025 (arXiv 2503.20783). Its second fix,
                no per-response length normalisation, is the loss aggregation: pair it with
                loss_agg=seq_mean_token_sum (Dr.GRPO's constant max-length divisor is a constant scale)
                or token_mean, not seq_mean_token_mean.
  rloo          r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_g). Ahmadian et al. 2024 (arXiv 2402.14740).
  reinforce_pp  "REINFORCE++-baseline" (Hu 2025, arXiv 2501.03262; OpenRLHF `reinforce_baseline`): the
                group-mean baseline, then division by the std over all samples of the batch (+ eps).
                Choice: the std is over samples, not tokens (OpenRLHF whitens over tokens), so a long
                response does not weigh more in the normaliser; the group-mean step already makes the
                batch mean exactly 0, so only the scale is normalised.
Groups of one sample get advantage 0 (no baseline can be formed without using the sample itself).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def _grpo(r: torch.Tensor, *, norm_by_std: bool, eps: float) -> torch.Tensor:
    centred = r - r.mean(dim=1, keepdim=True)
    if not norm_by_std or r.shape[1] < 2:
        return centred
    return centred / (r.std(dim=1, keepdim=True) + eps)


def _drgrpo(r: torch.Tensor, *, norm_by_std: bool, eps: float) -> torch.Tensor:
    return r - r.mean(dim=1, keepdim=True)


def _rloo(r: torch.Tensor, *, norm_by_std: bool, eps: float) -> torch.Tensor:
    g = r.shape[1]
    if g < 2:
        return torch.zeros_like(r)
    return (r - r.mean(dim=1, keepdim=True)) * (g / (g - 1))


def _reinforce_pp(r: torch.Tensor, *, norm_by_std: bool, eps: float) -> torch.Tensor:
    centred = r - r.mean(dim=1, keepdim=True)
    if centred.numel() < 2:
        return centred
    return centred / (centred.std() + eps)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _grpo, "drgrpo": _drgrpo, "rloo": _rloo, "reinforce_pp": _reinforce_pp,
}
"""Keyed by `AlgorithmConfig.advantage`; each maps rewards [N, G] fp32 -> advantages [N, G] fp32."""


def compute_advantages(rewards: torch.Tensor, *, estimator: str, group_size: Optional[int] = None,
                       norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages: rewards [N, G] or [N*G] (with group_size=G) -> same shape, fp32.

    estimator: `AlgorithmConfig.advantage`; norm_by_std: `AlgorithmConfig.norm_adv_by_std` (grpo only).
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm.advantage={estimator!r}: must be one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    r = rewards.to(torch.float32)
    if r.dim() == 1:
        if group_size is None or group_size < 1 or r.numel() % group_size != 0:
            raise ValueError(f"rewards has {r.numel()} entries: pass group_size=G (rollout.n_samples) dividing "
                             f"it, got group_size={group_size}")
        return ADVANTAGE_ESTIMATORS[estimator](r.view(-1, group_size), norm_by_std=norm_by_std,
                                               eps=eps).reshape(-1)
    if r.dim() != 2:
        raise ValueError(f"rewards has shape {tuple(r.shape)}: expected [N, G] or [N*G]")
    return ADVANTAGE_ESTIMATORS[estimator](r, norm_by_std=norm_by_std, eps=eps)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages [B] -> per-token [B, S] fp32, 0 outside the response mask [B, S]."""
    if advantages.dim() != 1 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}: expected [B] with B={mask.shape[0]} "
                         "(one per row of the response mask)")
    m = mask.to(torch.bool)
    return torch.where(m, advantages.to(torch.float32)[:, None], 0.0)
