"""RL objectives: advantages, PPO / Clip-Cov / KL-Cov losses with split-invariant selection, entropy law."""
from megaent.algorithms.advantages import ADVANTAGE_ESTIMATORS, broadcast_to_tokens, compute_advantages
from megaent.algorithms.aggregation import aggregate, loss_denominator
from megaent.algorithms.covariance import (
    covariance_stats, draw_seed, select_clip_cov, select_kl_cov, token_covariance, token_priority,
)
from megaent.algorithms.entropy_law import EarlyFit, EntropyLawFit, early_fit, fit_entropy_law
from megaent.ops.topk import global_topk_mask
from megaent.algorithms.kl import KL_ESTIMATORS, kl_k1, kl_k3
from megaent.algorithms.policy_loss import POLICY_LOSSES, policy_loss, ppo_token_loss, select_tokens

__all__ = [
    "ADVANTAGE_ESTIMATORS", "EarlyFit", "EntropyLawFit", "KL_ESTIMATORS", "POLICY_LOSSES", "aggregate",
    "broadcast_to_tokens", "compute_advantages", "covariance_stats", "draw_seed", "early_fit", "fit_entropy_law",
    "global_topk_mask", "kl_k1", "kl_k3", "loss_denominator", "policy_loss", "ppo_token_loss", "select_clip_cov",
    "select_kl_cov", "select_tokens", "token_covariance", "token_priority",
]
