"""Masked statistics whose means are global over a process group.

The building block of Clip-Cov / KL-Cov and of the metrics: a token-mean over
"all valid tokens of the mini-batch" must not depend on how those tokens are
split over data-parallel ranks. Every function here reduces its sums and
counts over `group` (None = single process), so each rank gets the statistic
of the concatenated batch.

Gradients: the value is global, and the gradient flows to this rank's `x`
as d(global statistic)/d(local x) (other ranks' contributions are constants
here; their own ranks get their own share). No collective in backward.
Empty masks give 0, never NaN. Variance and covariance are population
(biased, divide by N) statistics, as in the paper's Eq. for Cov over tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def global_sum(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum of `x` over `group`: a new tensor of x's shape and dtype (x itself for a single process, or when
    `group` is None); 1 SUM all-reduce on `group`. The one global-sum helper of megaent.ops and
    megaent.algorithms.

    Gradient: where autograd records (grad mode on and x requires grad) the result is differentiable w.r.t.
    the local x with d sum / d x = 1 (the other ranks' parts are constants here); elsewhere (no_grad,
    inside an autograd.Function, integer counts) it is the plain all-reduced copy. No collective in backward.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return total
    return x + (total - x.detach())


def masked_sum_count(x: torch.Tensor, mask: torch.Tensor, group: Group = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(global sum of x over mask, global count of mask) in fp32; 1 all-reduce of a 2-vector."""
    m = mask.to(torch.bool)
    # where, not x * mask: a masked-out inf/NaN (e.g. a padded token's log-prob) must not leak in.
    xs = torch.where(m, x.to(torch.float32), torch.zeros((), dtype=torch.float32, device=x.device))
    local = torch.stack([xs.sum(), m.sum().to(torch.float32)])
    both = global_sum(local, group)
    return both[0], both[1]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Mean of x over mask across `group`: 0-d fp32; 0 when no rank has a valid element."""
    s, n = masked_sum_count(x, mask, group)
    return s / n.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Population variance of x over mask across `group` (2 all-reduces)."""
    return masked_cov(x, x, mask, group)


def masked_cov(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Population covariance of x and y over mask across `group`: 0-d fp32 (2 all-reduces).

    The means are detached: d cov / d x_i = (y_i - mean y) / N exactly, because the global
    sum of (y - mean y) over valid tokens is 0. Letting autograd go through the means
    would instead add this rank's partial sum of (y - mean y) / N^2, which is not 0 on an
    uneven split (the other ranks' share of that path is missing), so the gradient would
    depend on how the batch is split.
    """
    m = mask.to(torch.bool)
    mx = masked_mean(x, m, group).detach()
    my = masked_mean(y, m, group).detach()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    xc = torch.where(m, x.to(torch.float32) - mx, zero)  # masked-out inf/NaN give 0 value and 0 gradient
    yc = torch.where(m, y.to(torch.float32) - my, zero)
    return masked_mean(xc * yc, m, group)
