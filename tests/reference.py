"""Plain single-process references for the tests: full tensors, textbook formulas, float64.

Imports nothing from `megaent.ops` (so a bug there cannot hide in its own reference).
Other test files may add functions here; keep each one short and obviously correct.
"""
from __future__ import annotations

import torch


def logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits [..., V] (no padding), targets [..., T] -> (log p(target), entropy) via log_softmax."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def head_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised LM head: hidden [T, H] @ weight [V, H].T -> `logprobs_entropy`."""
    return logprobs_entropy(hidden @ weight.t(), targets, temperature)


def shard_columns(full: torch.Tensor, tp: int, rank: int, pad_value: float) -> torch.Tensor:
    """Rank `rank`'s slice of the last dim padded to tp * ceil(V / tp) with `pad_value` (the model's layout)."""
    v = full.shape[-1]
    vl = -(-v // tp)
    pad = torch.full((*full.shape[:-1], tp * vl - v), pad_value, dtype=full.dtype)
    return torch.cat([full, pad], dim=-1)[..., rank * vl:(rank + 1) * vl].clone()


def shard_rows(full: torch.Tensor, tp: int, rank: int, pad_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rank `rank`'s rows of full [V, H], padded to tp * ceil(V / tp) rows (with `pad_rows` or zeros)."""
    v = full.shape[0]
    vl = -(-v // tp)
    extra = tp * vl - v
    pad = pad_rows[:extra] if pad_rows is not None else torch.zeros(extra, full.shape[1], dtype=full.dtype)
    return torch.cat([full, pad.to(full.dtype)], dim=0)[rank * vl:(rank + 1) * vl].clone()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x[mask] (0 if empty)."""
    v = x[mask.bool()]
    return v.mean() if v.numel() else x.sum() * 0


def masked_cov(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population covariance of x[mask], y[mask] (divide by N; 0 if empty)."""
    xv, yv = x[mask.bool()], y[mask.bool()]
    if xv.numel() == 0:
        return (x.sum() + y.sum()) * 0
    return ((xv - xv.mean()) * (yv - yv.mean())).mean()


def top_fraction_mean(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Mean of the top max(1, int(q * N)) of values[mask] by a full sort (0 if empty)."""
    v = values[mask.bool()].double()
    if v.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    k = max(1, int(q * v.numel()))
    return v.sort(descending=True).values[:k].mean()
