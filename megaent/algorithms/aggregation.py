"""Loss aggregation with a global normaliser, so micro-batch losses add up to the mini-batch loss.

A mini-batch is spread over DP ranks and micro-batches. Each `aggregate` call returns this micro-batch's
share, sum(per-token or per-sequence losses here) / denominator, where the denominator is global over the
whole mini-batch (`loss_denominator`, computed once by the trainer):
  token_mean           sum_tokens l / N_tokens                       (the paper's setting; DAPO)
  seq_mean_token_sum   sum_seqs (sum_tokens l) / N_seqs              (Dr.GRPO, without its constant
                                                                      max-length divisor: a constant scale)
  seq_mean_token_mean  sum_seqs (mean_tokens l) / N_seqs             (original GRPO)
N_seqs counts rows with at least one valid token (rows that are all padding are not sequences), so padding
rows never change the loss. Summing the shares (and their gradients) over micro-batches and DP ranks gives
the one-big-batch loss: the trainer must SUM gradients over DP (or average them and scale by DP).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megaent.config.schema import LossConfig
from megaent.ops.stats import global_sum

Group = Optional[dist.ProcessGroup]
AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def _check_mode(loss_agg: str) -> None:
    if loss_agg not in AGG_MODES:
        raise ValueError(f"algorithm.loss_agg={loss_agg!r}: must be one of {', '.join(AGG_MODES)}")


def _local_count(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    m = mask.to(torch.bool)
    if loss_agg == "token_mean":
        return m.sum().to(torch.float32)
    return m.reshape(m.shape[0], -1).any(dim=1).sum().to(torch.float32)


def loss_denominator(mask: Union[torch.Tensor, Sequence[torch.Tensor]], cfg: LossConfig,
                     group: Group = None) -> torch.Tensor:
    """Global normaliser of `cfg.loss_agg` over the mini-batch: 0-d fp32.

    mask: this rank's [B, S] response mask of the whole mini-batch, or a list of its micro-batch masks
    (shapes may differ). Token count for token_mean, count of non-empty rows for the seq_* modes, summed
    over `group` (the DP group). Collectives: 1 all-reduce on `group`.
    """
    _check_mode(cfg.loss_agg)
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    local = sum((_local_count(m, cfg.loss_agg) for m in masks), torch.zeros((), device=masks[0].device))
    return global_sum(local, group)


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, loss_agg: str, denominator: torch.Tensor) -> torch.Tensor:
    """Share of this micro-batch: loss_tok [B, S] fp32, mask [B, S] -> 0-d fp32 (0 if denominator is 0).

    Invalid positions are zeroed with `where`, so inf/NaN there never reaches the loss or its gradient.
    """
    _check_mode(loss_agg)
    m = mask.to(torch.bool)
    masked = torch.where(m, loss_tok, torch.zeros_like(loss_tok))
    if loss_agg == "seq_mean_token_mean":
        per_row = masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1)
        total = per_row.sum()
    else:
        total = masked.sum()
    return total / denominator.to(total.dtype).clamp(min=1.0)
