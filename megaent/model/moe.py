"""Router statistics of the MoE families: HF's load-balancing loss and the router-logits entropy metric.

`capture_router_logits(policy)` records, during a GPTPolicy forward, every local MoE layer's router logits
[T, E] fp32 (T = this rank's tokens in megatron-core's order, sequence-major: t = s * B + b; with sequence
parallelism each TP rank sees its S/TP slice). Both statistics are pure functions of those logits and reduce
over `group`, the ranks that hold the other tokens (tp_group under sequence parallelism, plus dp for a global
batch statistic), so they do not depend on the layout.

`load_balancing_loss` is HF's `load_balancing_loss_func` (Switch Transformer, Fedus et al. 2021, eq. 4-6, as
transformers' Mixtral and Qwen3-MoE compute it): softmax over all experts in fp32, top-k, then
E * sum_e f_e * P_e over the k choices, with f the fraction of routed tokens and P the mean router probability
per expert, means over the real tokens of all layers. HF multiplies it by `router_aux_loss_coef`
(`ModelArch.router_aux_loss_coef`) before adding it to the loss; so does the caller.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaent.ops.stats import global_sum


@contextlib.contextmanager
def capture_router_logits(policy: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yields a list that each local MoE router's forward appends its logits [T, E] fp32 to (layer order).

    The logits are the router's own input times its weight, recomputed from the hooked input (one [T, H] x
    [H, E] GEMM per layer; megatron-core does not return them). Gradients flow into the router weight and the
    hidden states, so a loss built on them trains the router as HF's aux loss does. No collectives."""
    from megatron.core.transformer.moe.router import TopKRouter

    out: list[torch.Tensor] = []

    def hook(mod: torch.nn.Module, args: tuple, _: object) -> None:
        x = args[0]
        out.append(F.linear(x.reshape(-1, x.shape[-1]), mod.weight.to(x.dtype)).float())

    handles = [m.register_forward_hook(hook) for m in policy.modules() if isinstance(m, TopKRouter)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def load_balancing_loss(router_logits: list[torch.Tensor], *, num_experts: int, top_k: int,
                        token_mask: Optional[torch.Tensor] = None,
                        group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """HF's load-balancing loss (module docstring) -> 0-d fp32, without `router_aux_loss_coef`.

    router_logits: per layer [T, E]; token_mask [T] bool (True = real token; None = all). Collectives: one
    all-reduce on `group` of the counts and probability sums (2 E k + E + 1 floats), none backward."""
    logits = torch.cat(router_logits)  # [L*T, E]
    mask = None if token_mask is None else token_mask.to(logits.device, torch.float32).repeat(len(router_logits))
    probs = torch.softmax(logits.float(), dim=-1)  # [L*T, E]
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).float()  # [L*T, k, E]
    w = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask
    count = global_sum(w.sum(), group)
    tokens_per_expert = global_sum((chosen * w[:, None, None]).sum(0), group) / count  # [k, E]
    prob_per_expert = global_sum((probs * w[:, None]).sum(0), group) / count  # [E]
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts


def router_entropy(router_logits: list[torch.Tensor], *, token_mask: Optional[torch.Tensor] = None,
                   group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Mean entropy (nats) of the router's softmax over experts, over real tokens and layers -> 0-d fp32 (a
    metric: detached). One all-reduce on `group`."""
    with torch.no_grad():
        logits = torch.cat(router_logits).float()  # [L*T, E]
        ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)  # [L*T]
        w = torch.ones_like(ent) if token_mask is None else \
            token_mask.to(ent.device, torch.float32).repeat(len(router_logits))
        both = torch.stack([(ent * w).sum(), w.sum()])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(both, group=group)
        return both[0] / both[1].clamp(min=1.0)


def aux_loss_coef(arch) -> float:
    """The coefficient HF trains the load-balancing loss with: `router_aux_loss_coef` when config.json's
    `output_router_logits` is true, else 0 (HF computes no aux loss then)."""
    return float(arch.router_aux_loss_coef) if arch.output_router_logits else 0.0


def micro_batch_router_terms(router_logits: list[torch.Tensor], arch, *, group: Optional[dist.ProcessGroup] = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(HF's load-balancing loss, router entropy) of one forward's captured router logits (every token real, as
    in a packed micro-batch); `group` holds the other tokens of the forward (tp_group under sequence
    parallelism). Two all-reduces on `group`."""
    aux = load_balancing_loss(router_logits, num_experts=arch.num_experts, top_k=arch.experts_per_token,
                              group=group)
    return aux, router_entropy(router_logits, group=group)
