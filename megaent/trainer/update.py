"""One RL update of a mini-batch over any TP x PP x DP layout, and forward-only log-probs, on megatron-core.

Everything runs through `megaent.trainer.mcore_engine`: megatron-core's `get_forward_backward_func` (1F1B
with PP > 1), its `DistributedDataParallel` and `get_megatron_optimizer`; log-probs and entropy come from the
vocab-chunked fused head on GPTModel's final hidden states and output-layer shard (no full-vocab logits).

`train_mini_batch` (cov_scope=global, Clip-Cov/KL-Cov):
  1. a forward-only schedule pass over all micro-batches -> current log-probs on the last stage;
  2. the selection over this rank's whole mini-batch, reduced over the DP group
     (`megaent.algorithms.select_tokens`), so it does not depend on the split;
  3. forward/backward of every micro-batch; each micro-batch loss is its share of the mini-batch loss over
     the GLOBAL denominator (`loss_denominator`);
  4. megatron-core's DP reduce (overlapped with the backward), global-norm clip and Adam step.
With ppo, or cov_scope=micro_batch, steps 1-2 are skipped and `policy_loss` selects per micro-batch on this
rank alone (group=None; the older behaviour).

Every rank of a pipeline holds the same micro-batches; only the last stage computes losses and statistics,
which are then broadcast over the pipeline (tensors on the device over pp_group, the loss stats as one host
object over the engine's gloo pipeline group) so that every rank (rank 0 logs) returns the same numbers.

Collectives per update: the schedule's (P2P on the pipeline, TP inside the model and the fused head, DDP's
reduce-scatter/all-reduce on dp_group), `select_tokens` / `policy_loss` (small all-reduces on dp_group, per
micro-batch for the loss stats: the micro-batch count is equal on all DP ranks), the optimizer's norm
all-reduce, 1 broadcast of the log-probs on pp_group, 1 broadcast_object_list of the stats on the gloo
pipeline group.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.config.schema import LossConfig
from megaent.parallel.state import ParallelState
from megaent.trainer.batching import MicroBatch, TrainSample, unpack_response
from megaent.trainer.mcore_engine import Engine, forward_backward


def _broadcast_from_last_stage(tensors: Optional[list[torch.Tensor]], like: list[torch.Tensor], *,
                               state: ParallelState) -> list[torch.Tensor]:
    """The last stage's tensors -> every stage of the pipeline (shapes of `like`). 1 broadcast on pp_group."""
    if state.pp == 1:
        return tensors
    sizes = [t.numel() for t in like]
    flat = torch.cat([t.reshape(-1).float() for t in tensors]) if state.is_last_stage else \
        torch.empty(sum(sizes), dtype=torch.float32, device=state.device)
    dist.broadcast(flat, src=state.pp_ranks[-1], group=state.pp_group)
    return [part.view_as(t) for part, t in zip(flat.split(sizes), like)]


def compute_logprobs(engine: Engine, micro_batches: Sequence[MicroBatch], *, state: ParallelState,
                     temperature: float = 1.0, fill_old: bool = False,
                     samples: Optional[Sequence[TrainSample]] = None,
                     on_hidden: Optional[Callable[[int, torch.Tensor], None]] = None
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Forward-only log-probs and entropy of every micro-batch, on every rank of the pipeline.

    micro_batches: on the policy's device (`MicroBatch.to`). Sets `mb.logprobs` / `mb.entropy` [1, S] fp32 (0
    where mask is 0); with `fill_old`, also `mb.old_logprobs` and `sample.old_logprobs` ([L - prompt_len]) of the
    given `samples` (matched by uid). Returns {uid: (logprobs, entropy)} per response. on_hidden: see
    `forward_backward`. Collectives: the forward schedule, 1 broadcast on pp_group.
    """
    policy = engine.policy
    was_training = policy.training
    policy.eval()
    try:
        res = forward_backward(engine, micro_batches, None, forward_only=True, temperature=temperature,
                               on_hidden=on_hidden)
    finally:
        policy.train(was_training)
    flat = [t for r in res for t in (r["logprobs"], r["entropy"])] if state.is_last_stage else None
    flat = _broadcast_from_last_stage(flat, [mb.mask for mb in micro_batches for _ in range(2)], state=state)
    for k, mb in enumerate(micro_batches):
        mb.logprobs, mb.entropy = flat[2 * k].float(), flat[2 * k + 1].float()
        if fill_old:
            mb.old_logprobs = mb.logprobs.clone()
    return logprobs_by_uid(micro_batches, samples=samples if fill_old else None)


def logprobs_by_uid(micro_batches: Sequence[MicroBatch], *, samples: Optional[Sequence[TrainSample]] = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{uid: (logprobs, entropy) [L - prompt_len]} from `mb.logprobs` / `mb.entropy`; also sets
    `sample.old_logprobs` of the given `samples` (matched by uid). No collectives."""
    by_uid = {s.uid: s for s in samples or []}
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for mb in micro_batches:
        lps, ents = unpack_response(mb.logprobs, mb), unpack_response(mb.entropy, mb)
        for uid in mb.uids:
            out[uid] = (lps[uid], ents[uid])
            if uid in by_uid:
                by_uid[uid].old_logprobs = lps[uid].clone()
    return out


def batch_metrics(micro_batches: Sequence[MicroBatch], *, state: ParallelState) -> dict[str, float]:
    """Entropy and covariance of the log-probs last computed by `compute_logprobs`, over all DP ranks.

    Keys: entropy/mean, cov/mean (Cov(logp, A), paper Eq. for the entropy change), cov/top_0.02pct, tokens.
    Collectives: small all-reduces on dp_group; one host sync.
    """
    from megaent.algorithms import covariance_stats, token_covariance
    from megaent.ops import masked_sum_count

    mask = torch.cat([mb.mask.reshape(-1) for mb in micro_batches])
    lp = torch.cat([(mb.logprobs if mb.logprobs is not None else mb.old_logprobs).reshape(-1)
                    for mb in micro_batches])
    ent = torch.cat([(mb.entropy if mb.entropy is not None else torch.zeros_like(mb.mask)).reshape(-1)
                     for mb in micro_batches])
    adv = torch.cat([mb.advantages.reshape(-1) for mb in micro_batches])
    grp = state.dp_group if state.dp > 1 else None
    cov = token_covariance(lp, adv, mask, grp)
    cs = covariance_stats(cov, mask, grp)
    s, n = masked_sum_count(ent, mask, grp)
    return {"entropy/mean": float(s / n.clamp(min=1.0)), "cov/mean": float(cs["cov_mean"]),
            "cov/top_0.02pct": float(cs["cov_top_0.02pct"]), "tokens": float(n)}


def _global_selection(engine: Engine, mbs: Sequence[MicroBatch], *, loss_cfg: LossConfig, state: ParallelState,
                      generator: Optional[torch.Generator], temperature: float) -> dict[int, torch.Tensor]:
    """Clip-Cov/KL-Cov selection over the whole mini-batch of all DP ranks (last stage): {id(mb): bool [1, S]}.

    A forward-only schedule pass for the current log-probs, then `select_tokens` (all-reduces on dp_group)."""
    from megaent.algorithms import select_tokens

    res = forward_backward(engine, mbs, None, forward_only=True, temperature=temperature)
    if not state.is_last_stage:
        return {}
    cat = lambda xs: torch.cat([x.reshape(-1) for x in xs])  # noqa: E731
    sel = select_tokens(cat(r["logprobs"] for r in res), cat(mb.old_logprobs for mb in mbs),
                        cat(mb.advantages for mb in mbs), cat(mb.mask for mb in mbs), loss_cfg,
                        state.dp_group if state.dp > 1 else None, generator, token_uid=cat(mb.token_uid for mb in mbs))
    parts = sel.split([mb.mask.numel() for mb in mbs])
    return {id(mb): part.view_as(mb.mask) for mb, part in zip(mbs, parts)}


def train_mini_batch(engine: Engine, micro_batches: Sequence[MicroBatch], *, loss_cfg: LossConfig,
                     state: ParallelState, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                     old_from_current: bool = False, lr: Optional[float] = None,
                     on_hidden: Optional[Callable[[int, torch.Tensor], None]] = None) -> dict[str, float]:
    """One optimizer update on this rank's micro-batches of a mini-batch (see the module docstring).

    micro_batches: this DP rank's share, packed (`make_micro_batches`, equal count on all DP ranks, on the
    policy's device), with `old_logprobs` filled, or, with `old_from_current` (the on-policy case: one update
    right after the rollout, PPO), not filled: the training forward's own log-probs, detached, are the old ones
    (ratio 1, the same gradient as a separate forward-only pass without its cost; TRL does this with
    num_iterations=1), and `mb.logprobs` / `mb.entropy` (pre-update, every stage, 1 broadcast on pp_group) are
    set for `batch_metrics`. generator: seeded equally on all ranks (Clip-Cov). lr: this step's learning rate
    (None keeps the optimizer's). Returns floats, equal on every rank: actor/loss (the mini-batch loss) and
    actor/<policy_loss stats> averaged over micro-batches, plus grad_norm, clip_coef, lr, skipped.
    """
    from megaent.algorithms import loss_denominator, policy_loss

    dp = state.dp_group if state.dp > 1 else None
    engine.policy.train()
    denom = loss_denominator([mb.mask for mb in micro_batches], loss_cfg, dp)
    global_scope = loss_cfg.policy_loss != "ppo" and loss_cfg.cov_scope == "global"
    if old_from_current and global_scope:
        raise ValueError(f"old_from_current needs policy_loss='ppo' or cov_scope='micro_batch' (got "
                         f"{loss_cfg.policy_loss!r}, {loss_cfg.cov_scope!r}): the global selection needs old "
                         "log-probs before the update")
    selected = _global_selection(engine, micro_batches, loss_cfg=loss_cfg, state=state, generator=generator,
                                 temperature=temperature) if global_scope else {}
    loss_group = dp if global_scope or loss_cfg.policy_loss == "ppo" else None

    router = _RouterLoss(engine, state, len(micro_batches))

    def loss_fn(lp: torch.Tensor, ent: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        ref = mb.ref_logprobs if loss_cfg.kl_coef != 0.0 else None
        if old_from_current:
            mb.logprobs, mb.entropy = lp.detach().float(), ent.detach().float()
            mb.old_logprobs = mb.logprobs
        loss, stats = policy_loss(lp, mb.old_logprobs, mb.advantages, mb.mask, loss_cfg, loss_group, generator,
                                  selected=selected.get(id(mb)), token_uid=mb.token_uid, denominator=denom,
                                  entropy=ent if loss_cfg.entropy_coef != 0.0 else ent.detach(), ref_logprobs=ref)
        return router.add(loss, stats)

    with router.capture():
        per_mb = forward_backward(engine, micro_batches, loss_fn, temperature=temperature,
                                  entropy_grad=loss_cfg.entropy_coef != 0.0, on_hidden=on_hidden)
    if old_from_current and state.pp > 1:
        flat = [t for mb in micro_batches for t in (mb.logprobs, mb.entropy)] if state.is_last_stage else None
        flat = _broadcast_from_last_stage(flat, [mb.mask for mb in micro_batches for _ in range(2)], state=state)
        for k, mb in enumerate(micro_batches):
            mb.logprobs, mb.entropy = flat[2 * k], flat[2 * k + 1]
            mb.old_logprobs = mb.logprobs.clone()
    out = engine.step(lr)
    out.update(_loss_stats(per_mb, engine=engine, state=state, dp=dp))
    return out


class _RouterLoss:
    """MoE policies at PP = 1: HF's load-balancing loss of each micro-batch's forward (HF computes it per forward)
    added to the loss with `megaent.model.moe.aux_loss_coef` (router_aux_loss_coef when config.json's
    output_router_logits is true), averaged over micro-batches and DP ranks like the policy loss; its value and
    the router entropy become moe/aux_loss and moe/router_entropy. Dense models and PP > 1 (the routers of
    earlier stages are not on the last stage): nothing."""

    def __init__(self, engine: Engine, state: ParallelState, n_micro: int) -> None:
        arch = getattr(engine.policy, "arch", None)
        self.on = bool(getattr(arch, "num_experts", 0)) and state.pp == 1
        self.policy, self.arch, self.logits = engine.policy, arch, []
        if self.on:
            from megatron.core.transformer.moe.router import TopKRouter

            # recomputation (activation checkpointing) re-runs the routers in backward: the last `layers`
            # captured logits are always the current forward's
            self.layers = sum(isinstance(m, TopKRouter) for m in engine.policy.modules())
            from megaent.model.moe import aux_loss_coef

            self.coef = aux_loss_coef(arch) / (n_micro * state.dp)
            sp = bool(getattr(engine.policy.config, "sequence_parallel", False)) and state.tp > 1
            self.group = state.tp_group if sp else None

    def capture(self) -> Any:
        import contextlib

        from megaent.model.moe import capture_router_logits

        if not self.on:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def cm():
            with capture_router_logits(self.policy) as self.logits:
                yield
        return cm()

    def add(self, loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, dict]:
        if not self.on:
            return loss, stats
        from megaent.model.moe import micro_batch_router_terms

        aux, ent = micro_batch_router_terms(self.logits[-self.layers:], self.arch, group=self.group)
        self.logits.clear()  # the next micro-batch's forward appends its own
        if self.coef:
            loss = loss + self.coef * aux
        return loss, {**stats, "moe/aux_loss": aux.detach(), "moe/router_entropy": ent}


def _loss_stats(per_mb: list[dict], *, engine: Engine, state: ParallelState, dp: Optional[dist.ProcessGroup]
                ) -> dict[str, float]:
    """Last stage: mean over micro-batches of each stat, loss summed over micro-batches and DP; sent to all stages
    (one host object over the engine's gloo pipeline group)."""
    box: list[Any] = [None]
    if state.is_last_stage:
        loss = torch.stack([s["loss"] for s in per_mb]).sum()
        if dp is not None:
            dist.all_reduce(loss, group=dp)
        skip = {"loss", "logprobs", "entropy"}
        stats = {(k if k.startswith("moe/") else f"actor/{k}"): float(torch.stack([s[k] for s in per_mb]).mean())
                 for k in per_mb[0] if k not in skip}
        box[0] = {"actor/loss": float(loss), **stats}
    if state.pp > 1:
        dist.broadcast_object_list(box, src=state.pp_ranks[-1], group=engine.pp_host)
    return box[0]
