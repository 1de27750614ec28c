"""AdamW over a TP x PP x DP sharded policy: global grad norm, clipping, schedules, fp32 masters, ZeRO-1.

What it is: `torch.optim.AdamW` applied to fp32 master copies of this rank's
parameters (the parameters themselves when they are fp32, on CPU), wrapped
with what model parallelism needs:
- the global gradient norm over every rank's shard, each element counted once:
  TP-replicated parameters (`tensor_model_parallel` unset: norms, row-parallel
  biases) only on tp_rank 0, and the tied embedding only on the first stage
  (the last stage's copy holds the same grad after `reduce_gradients`).
  Grads are identical over DP after the DP all-reduce, so one all-reduce of
  the squared norm over the model-parallel group (TP x PP) gives the norm on
  every rank;
- clipping as `torch.nn.utils.clip_grad_norm_` does (coef = max / (norm + 1e-6), at most 1);
- a non-finite norm skips the step (params, optimizer state and the schedule
  stay put) and reports `skipped = 1`;
- the learning rate: linear warmup from lr / warmup_steps to lr, then constant
  or cosine down to lr * min_lr_ratio at `total_steps`;
- bf16 parameters: grads are cast to fp32 onto the masters, AdamW runs in fp32,
  the result is rounded back into the bf16 parameters;
- ZeRO-1 (Rajbhandari et al. 2020, stage 1): each DP rank owns whole parameters
  (balanced by size) and keeps AdamW state and masters only for those; after the
  step each owner broadcasts its parameters over the DP group.
Weight decay applies to matrices (ndim >= 2) only, not to norms and biases
(the GPT-2/megatron convention).

Collectives per step: 1 all-reduce (1 float) on mp_group; with ZeRO-1, dp
broadcasts (one flat buffer per owner) on dp_group.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from megaent.config.schema import OptimizerConfig
from megaent.model.apex_ops import adamw_kernel, build_adamw
from megaent.parallel.grads import is_tied_embedding
from megaent.parallel.state import ParallelState

log = logging.getLogger(__name__)


def lr_at(step: int, *, cfg: OptimizerConfig, total_steps: Optional[int] = None) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if total_steps is None:
        raise ValueError("optimizer.schedule=cosine needs the total number of optimizer steps; pass total_steps= "
                         "to build_optimizer (trainer.steps * updates per step)")
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _owners(numels: list[int], parts: int) -> list[int]:
    """Owner DP rank of each parameter: largest first onto the lightest rank (deterministic)."""
    owner = [0] * len(numels)
    loads = [0] * parts
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        d = min(range(parts), key=lambda j: (loads[j], j))
        owner[i] = d
        loads[d] += numels[i]
    return owner


class DistributedAdamW:
    """AdamW with global-norm clipping, LR schedule, fp32 masters and optional ZeRO-1 (see module docstring)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, cfg: OptimizerConfig, state: ParallelState,
                 total_steps: Optional[int] = None, tp_sharded: Optional[set[int]] = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        # ids of params split over TP; default: megatron's `tensor_model_parallel` attribute
        self.tp_sharded = tp_sharded if tp_sharded is not None else {
            id(p) for p in self.params if getattr(p, "tensor_model_parallel", False)}
        self.cfg, self.state, self.total_steps = cfg, state, total_steps
        self.step_count = 0
        zero1 = cfg.zero1 and state.dp > 1
        self.owner = _owners([p.numel() for p in self.params], state.dp) if zero1 else [state.dp_rank] * len(
            self.params)
        self.zero1 = zero1
        self.owned = [i for i, o in enumerate(self.owner) if o == state.dp_rank]
        self.masters: dict[int, torch.Tensor] = {}
        for i in self.owned:
            p = self.params[i]
            self.masters[i] = p if p.dtype == torch.float32 else p.detach().to(torch.float32).clone()
        decay = [self.masters[i] for i in self.owned if self.params[i].dim() >= 2]
        no_decay = [self.masters[i] for i in self.owned if self.params[i].dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        # A ZeRO-1 rank may own nothing (more DP ranks than parameters): no inner optimizer then.
        # Kernel: apex FusedAdam / torch fused AdamW on CUDA, plain torch AdamW on CPU (megaent.model.apex_ops).
        self.kernel = adamw_kernel(state.device)
        self.inner = (build_adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, kernel=self.kernel)
                      if groups else None)
        if self.inner is not None and self.kernel != "torch" and state.rank == 0:
            log.info("optimizer: AdamW kernel %s", self.kernel)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters.values():
            m.grad = None

    def _counted(self, p: torch.Tensor) -> bool:
        if id(p) not in self.tp_sharded and self.state.tp_rank != 0:
            return False  # replicated over TP: count on tp_rank 0 only
        if self.state.pp > 1 and is_tied_embedding(p) and not self.state.is_first_stage:
            return False  # the last stage's copy of the tied embedding
        return True

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, fp32 0-d, equal on every rank (1 all-reduce on mp_group)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.state.device)
        for p in self.params:
            if p.grad is not None and self._counted(p):
                sq = sq + p.grad.detach().to(torch.float32).pow(2).sum()
        group = self.state.mp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        return sq.sqrt()

    def step(self) -> dict[str, torch.Tensor]:
        """Clip, step, write back; returns 0-d stats: grad_norm, clip_coef, lr, skipped."""
        norm = self.grad_norm()
        lr = lr_at(self.step_count, cfg=self.cfg, total_steps=self.total_steps)
        stats = {"grad_norm": norm, "lr": torch.tensor(lr), "skipped": torch.tensor(0.0),
                 "clip_coef": torch.tensor(1.0)}
        if not bool(torch.isfinite(norm)):  # one host sync per step, needed to decide
            stats["skipped"] = torch.tensor(1.0)
            return stats
        coef = torch.ones(())
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        stats["clip_coef"] = coef.detach()
        for i in self.owned:
            p, m = self.params[i], self.masters[i]
            g = torch.zeros_like(m) if p.grad is None else p.grad.detach().to(torch.float32)
            m.grad = g * coef
        if self.inner is not None:
            for group in self.inner.param_groups:
                group["lr"] = lr
            self.inner.step()
        with torch.no_grad():
            for i in self.owned:
                if self.masters[i] is not self.params[i]:
                    self.params[i].copy_(self.masters[i])
        if self.zero1:
            self._broadcast_params()
        self.step_count += 1
        return stats

    def _broadcast_params(self) -> None:
        """Each owner sends its updated parameters to the other DP ranks (1 broadcast per owner on dp_group)."""
        for d in range(self.state.dp):
            idx = [i for i, o in enumerate(self.owner) if o == d]
            if not idx:
                continue
            flat = torch.cat([self.params[i].detach().reshape(-1) for i in idx])
            dist.broadcast(flat, src=self.state.dp_ranks[d], group=self.state.dp_group)
            if d != self.state.dp_rank:
                with torch.no_grad():
                    for i, chunk in zip(idx, flat.split([self.params[i].numel() for i in idx])):
                        self.params[i].copy_(chunk.view_as(self.params[i]))

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state (its ZeRO-1 shard), the fp32 masters of non-fp32 params, the step count."""
        masters = {i: m for i, m in self.masters.items() if m is not self.params[i]}
        inner = None if self.inner is None else self.inner.state_dict()
        return {"step": self.step_count, "inner": inner, "masters": masters, "owner": self.owner}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["owner"] != self.owner:
            raise ValueError("optimizer checkpoint was written with a different ZeRO-1 sharding (optimizer.zero1 or "
                             "the data-parallel size changed); resume with the same layout")
        self.step_count = int(sd["step"])
        if self.inner is not None:
            # deepcopy: torch keeps the given tensors when dtype/device already match, which would alias
            # the moments of the optimizer the state came from
            self.inner.load_state_dict(copy.deepcopy(sd["inner"]))
        with torch.no_grad():
            for i, m in sd["masters"].items():
                self.masters[i].copy_(m)


def build_optimizer(model: torch.nn.Module, *, cfg: OptimizerConfig, state: ParallelState,
                    total_steps: Optional[int] = None) -> DistributedAdamW:
    """The optimizer of this rank's stage/shard of `model` (all parameters with requires_grad).

    TP-sharded parameters: those with megatron's `tensor_model_parallel` attribute, plus, for a model with
    `param_specs()` (megaent's Policy), those whose TP kind is not "replicated". (megatron-core sets the
    attribute on weights only when `perform_initialization=True`, so the specs are the reliable source.)
    """
    sharded = {id(p) for p in model.parameters() if getattr(p, "tensor_model_parallel", False)}
    if hasattr(model, "param_specs"):
        named = dict(model.named_parameters())
        for spec in model.param_specs():
            if spec.name in named and any(part.kind != "replicated" for part in spec.parts):
                sharded.add(id(named[spec.name]))
    return DistributedAdamW(model.parameters(), cfg=cfg, state=state, total_steps=total_steps, tp_sharded=sharded)
