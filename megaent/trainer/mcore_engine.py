"""The RL update on megatron-core's own engine: DDP, its optimizer, its pipeline schedules.

`build_engine(policy, state, ...)` wraps a `GPTPolicy`'s GPTModel in megatron-core's
`DistributedDataParallel` (fp32 main gradients in a contiguous buffer, the DP reduce overlapped
with the backward, the distributed optimizer's reduce-scatter when DP > 1) and builds
`get_megatron_optimizer` (Adam; the distributed optimizer on by default when DP > 1).
`forward_backward(engine, micro_batches, loss_fn)` runs `get_forward_backward_func()` (1F1B with
PP > 1, no pipelining otherwise) over packed THD micro-batches of varying length
(`megaent.trainer.batching.MicroBatch` rows in megatron-core's THD layout); `engine.step(lr)` sets the
learning rate, clips and steps. `lr_at` is the schedule (linear warmup, then constant or cosine).

Loss scaling: megatron-core divides each micro-batch loss by the number of micro-batches and DDP
averages gradients over DP. megaent's policy losses already return each micro-batch's share of the
mini-batch loss over a global denominator (`megaent.algorithms.loss_denominator`), whose sum over
micro-batches and DP ranks is the loss; `loss_fn`'s loss is therefore multiplied by M x DP so the
gradient is exactly that sum's, however the batch is split.

Device rule: every tensor of a micro-batch lives on the policy's device before it meets the model; the caller
moves it (`MicroBatch.to`), `forward_backward` refuses one that is elsewhere.
"""
from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.parallel import ParallelState
from megaent.trainer.batching import MicroBatch


def lr_at(step: int, *, lr: float, warmup_steps: int = 0, schedule: str = "constant", min_lr_ratio: float = 0.0,
          total_steps: Optional[int] = None) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from lr / warmup_steps, then constant or
    cosine down to lr * min_lr_ratio at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if total_steps is None:
        raise ValueError("optimizer.schedule=cosine needs the total number of optimizer steps (total_steps=)")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def host_pp_group(state: ParallelState) -> Optional[dist.ProcessGroup]:
    """A gloo group over this rank's pipeline stages, for host-side objects (None when PP = 1).

    The pipeline group itself when it is gloo already (CPU); else one gloo group per pipeline, created by every
    rank (torch's `new_group` is collective over the world). Layout tp-dp-pp: rank = t + tp (d + dp p)."""
    if state.pp == 1:
        return None
    if state.backend == "gloo":
        return state.pp_group
    mine = None
    for d in range(state.dp):
        for t in range(state.tp):
            ranks = [t + state.tp * (d + state.dp * p) for p in range(state.pp)]
            g = dist.new_group(ranks, backend="gloo")
            if state.rank in ranks:
                mine = g
    return mine


@dataclass
class Engine:
    """A policy under megatron-core DDP with its optimizer."""

    policy: Any  # megaent.model.gpt_policy.GPTPolicy
    ddp: Any
    optimizer: Any
    state: ParallelState
    clip_grad: float = 1.0
    weight_decay: float = 0.0
    step_count: int = 0
    """Optimizer steps taken (checkpointed; the schedule's position)."""
    pp_host: Optional[dist.ProcessGroup] = None
    """gloo group over the pipeline stages, for host-side objects (`host_pp_group`)."""
    head_chunk_size: int = 4096
    """Vocab columns per chunk of the fused LM head (`trainer.head_chunk_size`); its extra memory ~ T x C fp32."""
    fused_head: bool = True
    """Log-probs through the vocab-chunked fused head (False: full [T, V/TP] logits, the test reference)."""

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, lr: Optional[float] = None) -> dict[str, float]:
        """Set the learning rate (when given), clip and step; {grad_norm, clip_coef, lr, skipped}.

        Collectives: the optimizer's (the global grad-norm all-reduce over the model-parallel group, the
        distributed optimizer's parameter all-gather over DP)."""
        for g in self.optimizer.param_groups:
            if lr is not None:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            # megatron-core's groups carry wd_mult (0 for biases and norms), applied by its param scheduler,
            # which megaent does not use: apply it here (decay on matrices only)
            g["weight_decay"] = self.weight_decay * g.get("wd_mult", 1.0)
            lr_used = g["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        norm = float(grad_norm) if grad_norm is not None else 0.0
        self.step_count += int(bool(ok))
        coef = min(1.0, self.clip_grad / (norm + 1e-6)) if self.clip_grad > 0 else 1.0
        return {"grad_norm": norm, "clip_coef": coef, "lr": float(lr_used), "skipped": float(not ok)}


def build_engine(policy: Any, state: ParallelState, *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip_grad: float = 1.0,
                 distributed_optimizer: Optional[bool] = None, overlap_grad_reduce: bool = True,
                 bucket_size: Optional[int] = None) -> Engine:
    """megatron-core DDP + optimizer around `policy.model`; the distributed optimizer when DP > 1 unless told."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    distopt = state.dp > 1 if distributed_optimizer is None else distributed_optimizer
    cfg = policy.config
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                            use_distributed_optimizer=distopt, bucket_size=bucket_size)
    ddp = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=policy.model)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    if overlap_grad_reduce:
        cfg.grad_sync_func = ddp.start_grad_sync
    opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                              adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad,
                              bf16=policy.dtype == torch.bfloat16, params_dtype=policy.dtype,
                              use_distributed_optimizer=distopt)
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    return Engine(policy=policy, ddp=ddp, optimizer=optimizer, state=state, clip_grad=clip_grad,
                  weight_decay=weight_decay, pp_host=host_pp_group(state))


LossFn = Callable[[torch.Tensor, torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""loss_fn(logprobs [1, T] fp32, entropy [1, T] fp32, micro-batch) -> (this micro-batch's share of the loss,
stats of 0-d tensors)."""


def forward_backward(engine: Engine, micro_batches: Sequence[MicroBatch], loss_fn: Optional[LossFn], *,
                     forward_only: bool = False, temperature: float = 1.0, fused_head: Optional[bool] = None,
                     entropy_grad: bool = False,
                     on_hidden: Optional[Callable[[int, torch.Tensor], None]] = None
                     ) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward) of every micro-batch through megatron-core's schedule.

    Last stage: log-probs and entropy of the targets through the fused vocab-parallel head (or the full
    vocab-parallel logits with fused_head=False; None = `engine.fused_head`), then `loss_fn`. Returns the last stage's per-micro-batch
    stats ({"logprobs", "entropy"} [1, T] plus loss_fn's) in order; [] on other stages. on_hidden(k, hidden
    [T, H]) sees the last stage's final hidden states of micro-batch k (fused head only; detached), e.g. for
    the entropy-change probe.
    Collectives: the schedule's P2P on the pipeline, TP all-reduces inside the model and the head ops,
    DDP's grad reduce over DP (overlapped) and finalize_model_grads.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaent.ops import fused_head_logprobs_entropy, vocab_parallel_logprobs_entropy

    policy, st = engine.policy, engine.state
    fused_head = engine.fused_head if fused_head is None else fused_head
    mbs = list(micro_batches)
    for mb in mbs:  # the device rule: the caller moves the micro-batches (MicroBatch.to), and they stay its objects
        if mb.input_ids.device != st.device:
            raise ValueError(f"micro-batch on {mb.input_ids.device}, the policy on {st.device}: move it first "
                             "(MicroBatch.to(state.device))")
    n = len(mbs)
    scale = float(n * st.dp)
    grp = st.tp_group if st.tp > 1 else None
    it = iter(enumerate(mbs))
    out: list[dict[str, torch.Tensor]] = []

    def forward_step(data_iterator, model):
        del model  # the DDP wrapper of policy.model; the schedule set its input tensor
        k, mb = next(data_iterator)
        psp = mb.packed_seq_params()
        ids = mb.input_ids if st.is_first_stage else None
        if not st.is_last_stage:
            return policy(ids, packed_seq_params=psp), lambda t: (t.sum() * 0, {})
        if fused_head:
            h = policy.final_hidden(ids, packed_seq_params=psp)
            if on_hidden is not None:
                on_hidden(k, h.detach()[0])
            lp, ent = fused_head_logprobs_entropy(h, policy.head_weight, mb.targets, grp, temperature=temperature,
                                                  vocab_size=policy.vocab_size, entropy_grad=entropy_grad,
                                                  chunk_size=engine.head_chunk_size)
        else:
            lp, ent = vocab_parallel_logprobs_entropy(policy(ids, packed_seq_params=psp), mb.targets, grp,
                                                      temperature=temperature)
        lp, ent = lp * mb.mask, ent * mb.mask

        def loss_func(_: torch.Tensor):
            rec = {"logprobs": lp.detach(), "entropy": ent.detach()}
            if loss_fn is None:
                out.append(rec)
                return lp.sum() * 0, {}
            loss, stats = loss_fn(lp, ent, mb)
            out.append({**rec, "loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}})
            return loss * scale, {}

        return lp, loss_func

    if not forward_only:
        engine.zero_grad()
    longest = max(int(mb.input_ids.shape[1]) for mb in mbs)
    # megatron's schedules leave autograd on in forward_only (their callers, e.g. evaluate, wrap no_grad): without
    # this each forward-only micro-batch would build its graph and keep the last one's activations alive
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=it, model=[engine.ddp],
                                    num_microbatches=n, seq_length=longest, micro_batch_size=1,
                                    forward_only=forward_only)
    return out
