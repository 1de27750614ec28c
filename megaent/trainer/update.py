"""One RL update of a mini-batch over any TP x PP x DP layout, and forward-only log-probs.

`train_mini_batch` (cov_scope=global, Clip-Cov/KL-Cov):
  1. forward-only pass over all micro-batches -> current log-probs on the last stage;
  2. the selection over this rank's whole mini-batch, reduced over the DP group
     (`megaent.algorithms.select_tokens`), so it does not depend on the split;
  3. 1F1B forward/backward of every micro-batch; each micro-batch loss is its
     share of the mini-batch loss over the GLOBAL denominator (`loss_denominator`);
  4. DP grad SUM + tied-embedding SUM (`megaent.parallel.grads`), global-norm clip, AdamW step.
With ppo, or cov_scope=micro_batch, step 1-2 are skipped and `policy_loss`
selects per micro-batch on this rank alone (group=None; the older behaviour).

Every rank of a pipeline holds the same micro-batches; only the last stage
computes losses and statistics, which are then broadcast over the PP group so
that every rank (rank 0 logs) returns the same numbers.

Collectives per update: see `forward_only`, `forward_backward_1f1b` (P2P on the
pipeline), `select_tokens` / `policy_loss` (small all-reduces on dp_group, per
micro-batch for the loss stats: the micro-batch count is equal on all DP ranks),
`reduce_gradients`, the optimizer's norm all-reduce, 1 broadcast_object_list
of the stats on pp_group.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.config.schema import LossConfig
from megaent.parallel.grads import reduce_gradients
from megaent.parallel.pipeline import broadcast_from_last_stage, forward_backward_1f1b, forward_only
from megaent.parallel.state import ParallelState
from megaent.trainer.batching import MicroBatch, TrainSample, unpack_response


def _stage_fn(policy: Any, *, fused_head: bool):
    """stage_fn(mb, hidden) for the pipeline: hidden [B, S, H], or the last stage's logits / final hidden."""
    st = policy.state

    def run(mb: MicroBatch, x: Optional[torch.Tensor]) -> torch.Tensor:
        kw = dict(position_ids=mb.position_ids, segment_ids=mb.segment_ids, prefix_ids=mb.prefix_ids)
        ids = mb.input_ids if st.is_first_stage else None
        if st.is_last_stage and fused_head:
            return policy.final_hidden(ids, hidden_states=x, **kw)
        source = getattr(policy, "replay_source", None)  # rollout-forward reuse (megaent.model.tape)
        hit = source.indices(mb) if source is not None else None
        if hit is None:
            return policy(ids, hidden_states=x, **kw)
        from megaent.model.tape import replaying

        with replaying(policy, *hit):
            return policy(ids, hidden_states=x, **kw)

    return run


def _logprobs_entropy(policy: Any, out: torch.Tensor, mb: MicroBatch, *, temperature: float, fused_head: bool,
                      entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Last stage output (logits [B, S, Vl] or final hidden [B, S, H]) -> (logp, entropy) [B, S] fp32."""
    from megaent.ops import fused_head_logprobs_entropy, vocab_parallel_logprobs_entropy

    grp = policy.state.tp_group if policy.state.tp > 1 else None
    if fused_head:
        return fused_head_logprobs_entropy(out, policy.head_weight, mb.targets, grp, temperature=temperature,
                                           vocab_size=policy.vocab_size, entropy_grad=entropy_grad)
    return vocab_parallel_logprobs_entropy(out, mb.targets, grp, temperature=temperature)


def _hidden(policy: Any) -> tuple[int, torch.dtype]:
    return policy.arch.hidden_size, policy.dtype


def compute_logprobs(policy: Any, micro_batches: Sequence[MicroBatch], *, state: ParallelState,
                     temperature: float = 1.0, fill_old: bool = False,
                     samples: Optional[Sequence[TrainSample]] = None, fused_head: bool = False
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Forward-only log-probs and entropy of every micro-batch, on every rank of the pipeline.

    Sets `mb.logprobs` / `mb.entropy` [1, S] fp32 (0 where mask is 0); with
    `fill_old`, also `mb.old_logprobs` and `sample.old_logprobs` ([L - prompt_len])
    of the given `samples` (matched by uid). Returns {uid: (logprobs, entropy)}
    per response. Collectives: forward P2P on the pipeline, 1 broadcast on pp_group.
    """
    hidden, dtype = _hidden(policy)

    def out_fn(out: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        lp, ent = _logprobs_entropy(policy, out, mb, temperature=temperature, fused_head=fused_head,
                                    entropy_grad=False)
        return lp * mb.mask, ent * mb.mask

    was_training = policy.training
    policy.eval()
    try:
        res = forward_only(_stage_fn(policy, fused_head=fused_head), micro_batches, output_fn=out_fn, state=state,
                           hidden_size=hidden, dtype=dtype)
    finally:
        policy.train(was_training)
    return _share_logprobs(micro_batches, res if state.is_last_stage else None, state=state, fill_old=fill_old,
                           samples=samples)


def _share_logprobs(micro_batches: Sequence[MicroBatch], res: Optional[list[tuple[torch.Tensor, torch.Tensor]]], *,
                    state: ParallelState, fill_old: bool, samples: Optional[Sequence[TrainSample]]
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Last stage's (logp, entropy) [1, S] per micro-batch -> `mb.logprobs` / `mb.entropy` on every stage (and
    the old log-probs with `fill_old`); returns {uid: (logprobs, entropy)}. 1 broadcast on pp_group."""
    flat = [t for pair in res for t in pair] if state.is_last_stage else None
    like = [mb.mask for mb in micro_batches for _ in range(2)]
    flat = broadcast_from_last_stage(flat, like, state=state)
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


def batch_metrics(micro_batches: Sequence[MicroBatch], *, state: ParallelState, policy_loss: str = "ppo",
                  use_current: bool = False) -> dict[str, float]:
    """Entropy and covariance of the log-probs last computed by `compute_logprobs`, over all DP ranks.

    Keys: entropy/mean, cov/mean (Cov(logp, A), paper Eq. for the entropy change), cov/top_0.02pct, tokens.
    `use_current` is accepted for symmetry: both calls use `mb.logprobs` (the
    latest forward); without it and before any forward, old log-probs are used.
    Collectives: small all-reduces on dp_group; one host sync.
    """
    from megaent.algorithms import covariance_stats, token_covariance
    from megaent.ops import masked_sum_count

    del policy_loss  # the same statistics for every objective
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


def _global_selection(policy: Any, mbs: Sequence[MicroBatch], *, loss_cfg: LossConfig, state: ParallelState,
                      generator: Optional[torch.Generator], temperature: float, fused_head: bool
                      ) -> dict[int, torch.Tensor]:
    """Clip-Cov/KL-Cov selection over the whole mini-batch of all DP ranks (last stage): {id(mb): bool [1, S]}."""
    from megaent.algorithms import select_tokens

    hidden, dtype = _hidden(policy)

    def out_fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        return _logprobs_entropy(policy, out, mb, temperature=temperature, fused_head=fused_head,
                                 entropy_grad=False)[0]

    lps = forward_only(_stage_fn(policy, fused_head=fused_head), mbs, output_fn=out_fn, state=state,
                       hidden_size=hidden, dtype=dtype)
    if not state.is_last_stage:
        return {}
    cat = lambda xs: torch.cat([x.reshape(-1) for x in xs])  # noqa: E731
    sel = select_tokens(cat(lps), cat(mb.old_logprobs for mb in mbs), cat(mb.advantages for mb in mbs),
                        cat(mb.mask for mb in mbs), loss_cfg, state.dp_group if state.dp > 1 else None, generator,
                        token_uid=cat(mb.token_uid for mb in mbs))
    parts = sel.split([mb.mask.numel() for mb in mbs])
    return {id(mb): part.view_as(mb.mask) for mb, part in zip(mbs, parts)}


def train_mini_batch(policy: Any, optimizer: Any, micro_batches: Sequence[MicroBatch], *, loss_cfg: LossConfig,
                     state: ParallelState, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                     fused_head: bool = False, bucket_mb: float = 25.0, old_from_current: bool = False
                     ) -> dict[str, float]:
    """One optimizer update on this rank's micro-batches of a mini-batch (see the module docstring).

    micro_batches: this DP rank's share, packed (`make_micro_batches`, equal count
    on all DP ranks), with `old_logprobs` filled, or, with `old_from_current` (the
    on-policy case: one update right after the rollout, PPO), not filled: the
    training forward's own log-probs, detached, are the old ones (ratio 1, the same
    gradient as a separate forward-only pass without its cost; TRL does this with
    num_iterations=1), and `mb.logprobs` / `mb.entropy` (pre-update, every stage,
    1 broadcast on pp_group) are set for `batch_metrics`. generator: seeded equally on all
    ranks (Clip-Cov). Returns floats, equal on every rank: actor/loss (the
    mini-batch loss) and actor/<policy_loss stats> averaged over micro-batches,
    plus grad_norm, clip_coef, lr, skipped from the optimizer.
    """
    from megaent.algorithms import loss_denominator, policy_loss

    dp = state.dp_group if state.dp > 1 else None
    hidden, dtype = _hidden(policy)
    policy.train()
    denom = loss_denominator([mb.mask for mb in micro_batches], loss_cfg, dp)
    global_scope = loss_cfg.policy_loss != "ppo" and loss_cfg.cov_scope == "global"
    if old_from_current and global_scope:
        raise ValueError(f"old_from_current needs policy_loss='ppo' or cov_scope='micro_batch' (got "
                         f"{loss_cfg.policy_loss!r}, {loss_cfg.cov_scope!r}): the global selection needs old "
                         "log-probs before the update")
    selected = _global_selection(policy, micro_batches, loss_cfg=loss_cfg, state=state, generator=generator,
                                 temperature=temperature, fused_head=fused_head) if global_scope else {}
    loss_group = dp if global_scope or loss_cfg.policy_loss == "ppo" else None

    def loss_fn(out: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        lp, ent = _logprobs_entropy(policy, out, mb, temperature=temperature, fused_head=fused_head,
                                    entropy_grad=loss_cfg.entropy_coef != 0.0)
        ref = mb.ref_logprobs if loss_cfg.kl_coef != 0.0 else None
        if old_from_current:
            mb.logprobs, mb.entropy = (lp.detach() * mb.mask).float(), (ent.detach() * mb.mask).float()
            mb.old_logprobs = mb.logprobs
        loss, stats = policy_loss(lp, mb.old_logprobs, mb.advantages, mb.mask, loss_cfg, loss_group, generator,
                                  selected=selected.get(id(mb)), token_uid=mb.token_uid, denominator=denom,
                                  entropy=ent, ref_logprobs=ref)
        return loss, {"loss": loss.detach(), **stats}

    optimizer.zero_grad()
    per_mb = forward_backward_1f1b(_stage_fn(policy, fused_head=fused_head), micro_batches, loss_fn=loss_fn,
                                   state=state, hidden_size=hidden, dtype=dtype)
    if old_from_current and state.pp > 1:
        _share_logprobs(micro_batches, [(mb.logprobs, mb.entropy) for mb in micro_batches]
                        if state.is_last_stage else None, state=state, fill_old=True, samples=None)
    reduce_gradients(policy, state=state, bucket_mb=bucket_mb)
    opt_stats = optimizer.step()
    optimizer.zero_grad()
    out = {k: float(v) for k, v in opt_stats.items()}
    out.update(_loss_stats(per_mb, state=state, dp=dp))
    return out


def _loss_stats(per_mb: list[dict], *, state: ParallelState, dp: Optional[dist.ProcessGroup]) -> dict[str, float]:
    """Last stage: mean over micro-batches of each stat, loss summed over micro-batches and DP; sent to all stages."""
    box: list[Any] = [None]
    if state.is_last_stage:
        loss = torch.stack([s["loss"] for s in per_mb]).sum()
        if dp is not None:
            dist.all_reduce(loss, group=dp)
        stats = {f"actor/{k}": float(torch.stack([s[k] for s in per_mb]).mean()) for k in per_mb[0] if k != "loss"}
        box[0] = {"actor/loss": float(loss), **stats}
    if state.pp > 1:
        dist.broadcast_object_list(box, src=state.pp_ranks[-1], group=state.pp_group)
    return box[0]
