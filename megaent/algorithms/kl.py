"""Per-token KL estimators to a reference policy (J. Schulman, "Approximating KL Divergence", 2020).

With d = logp_ref - logp for tokens sampled from the current policy:
  k1 = -d                    unbiased, high variance, can be negative;
  k3 = exp(d) - d - 1        unbiased, low variance, always >= 0 ("low_var_kl" in verl).
d is clamped to [-20, 20] in k3 so that one far-off token cannot overflow exp (a no-op on sane data).
"""
from __future__ import annotations

from typing import Callable

import torch

_K3_CLAMP = 20.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] fp32: logp - logp_ref."""
    return logprobs.to(torch.float32) - ref_logprobs.to(torch.float32)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] fp32: exp(d) - d - 1 with d = logp_ref - logp (clamped to +-20)."""
    d = (ref_logprobs.to(torch.float32) - logprobs.to(torch.float32)).clamp(-_K3_CLAMP, _K3_CLAMP)
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}
"""Keyed by `LossConfig.kl_estimator`."""
