"""Divergence guard: a step whose loss, gradient norm or weights are not finite ends the run before anything is
saved from it.

The optimizer already skips an update whose gradient norm is not finite (`optimizer.py`), so a NaN gradient
cannot reach the weights; a run that keeps producing them learns nothing, though, and a blown-up learning rate
reaches inf weights through finite gradients. `check_step` runs after every step, before that step's checkpoint
or HF export: any rank that sees a non-finite value stops every rank (1 all-reduce), and the trainer exits with
`EXIT_DIVERGED` (4), which a job script must not requeue (3 means "requeue me").
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from megaent.trainer.checkpoint import latest_checkpoint

EXIT_DIVERGED = 4
WATCHED = ("actor/loss", "grad_norm")
"""Step metrics that must be finite (equal on every rank: see `update.train_mini_batch`)."""


def _bad_metrics(metrics: dict[str, Any]) -> list[str]:
    return [f"{k}={metrics[k]}" for k in WATCHED
            if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])]


def _bad_weights(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    named = list(named)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])  # one host sync below
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def check_step(step: int, metrics: dict[str, Any], named_parameters: Iterable[tuple[str, torch.Tensor]], *,
               run_dir: Optional[Path] = None, device: Any = "cpu") -> Optional[str]:
    """Collective over the world: None when step `step` is finite everywhere, else the message to stop with."""
    bad = _bad_metrics(metrics)
    weights = _bad_weights(named_parameters)
    flag = torch.tensor([1.0 if bad or weights else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    what = ", ".join(bad + ([f"non-finite weights in {', '.join(weights[:3])}"
                             + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")] if weights else []))
    last = latest_checkpoint(run_dir) if run_dir is not None else None
    where = f"; the last good checkpoint is {last}" if last else ""
    return (f"step {step}: training diverged ({what or 'non-finite values on another rank'}); stopped before "
            f"writing a checkpoint or HF export from it{where}. Lower optimizer.lr or set optimizer.grad_clip, "
            "then resume (megaent train --resume RUN_DIR optimizer.lr=...)")
