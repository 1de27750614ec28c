"""The RL update on megatron-core's own engine: DDP, its optimizer, its pipeline schedules.

`build_engine(policy, state, ...)` wraps a `GPTPolicy`'s GPTModel in megatron-core's
`DistributedDataParallel` (fp32 main gradients in a contiguous buffer, the DP reduce overlapped
with the backward, the distributed optimizer's reduce-scatter when DP > 1) and builds
`get_megatron_optimizer` (Adam; the distributed optimizer on by default when DP > 1).
`forward_backward(engine, micro_batches, loss_fn)` runs `get_forward_backward_func()` (1F1B with
PP > 1, no pipelining otherwise) over packed THD micro-batches of varying length
(`PackedMicroBatch`); `engine.step()` clips and steps.

Loss scaling: megatron-core divides each micro-batch loss by the number of micro-batches and DDP
averages gradients over DP. megaent's policy losses already return each micro-batch's share of the
mini-batch loss over a global denominator (`megaent.algorithms.loss_denominator`), whose sum over
micro-batches and DP ranks is the loss; `loss_fn`'s loss is therefore multiplied by M x DP so the
gradient is exactly that sum's, however the batch is split.

Device rule: every tensor of a micro-batch is moved to the policy's device before it meets the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from megaent.parallel import ParallelState


@dataclass
class PackedMicroBatch:
    """Samples packed into one row in megatron-core's THD layout.

    tokens [1, T] long: the samples' tokens back to back, T padded to a multiple of TP with sequence
    parallelism (pad tokens form one last segment, mask 0); cu_seqlens [n + 1] int32; targets [1, T]
    (the next token within each sample, 0 at a sample's last position); mask [1, T] fp32 (1 on predicted
    response tokens); advantages / old_logprobs [1, T] fp32 (per token, 0 where mask is 0).
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device) -> "PackedMicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedMicroBatch(move(self.tokens), move(self.cu_seqlens), move(self.targets), move(self.mask),
                                move(self.advantages), move(self.old_logprobs), dict(self.extra))

    def packed_seq_params(self) -> Any:
        from megatron.core.packed_seq_params import PackedSeqParams

        lens = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        longest = int(lens.max()) if lens.numel() else 0
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=longest, max_seqlen_kv=longest)


def pack_samples(samples: Sequence[tuple[torch.Tensor, int, float]], *, multiple: int = 1) -> PackedMicroBatch:
    """(tokens [L], prompt_len, advantage) per sample -> one `PackedMicroBatch` (on the CPU).

    Position t predicts token t + 1 of its own sample; it is a response position when t + 1 >= prompt_len.
    `multiple`: pad T up to it (TP with sequence parallelism)."""
    toks, tgts, masks, advs, lens = [], [], [], [], []
    for tokens, prompt_len, adv in samples:
        n = tokens.numel()
        tgt = torch.zeros(n, dtype=torch.long)
        tgt[:-1] = tokens[1:]
        m = torch.zeros(n)
        m[max(prompt_len - 1, 0):n - 1] = 1.0
        toks.append(tokens.long()), tgts.append(tgt), masks.append(m), advs.append(m * adv), lens.append(n)
    pad = (-sum(lens)) % multiple
    if pad:
        toks.append(torch.zeros(pad, dtype=torch.long)), tgts.append(torch.zeros(pad, dtype=torch.long))
        masks.append(torch.zeros(pad)), advs.append(torch.zeros(pad)), lens.append(pad)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    row = lambda xs: torch.cat(xs)[None]  # noqa: E731
    return PackedMicroBatch(row(toks), cu, row(tgts), row(masks), row(advs))


@dataclass
class Engine:
    """A policy under megatron-core DDP with its optimizer."""

    policy: Any  # megaent.model.gpt_policy.GPTPolicy
    ddp: Any
    optimizer: Any
    state: ParallelState

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> dict[str, float]:
        """Clip and step; {grad_norm, skipped}. Collectives: the optimizer's (norm all-reduce, DistOpt gathers)."""
        ok, grad_norm, _ = self.optimizer.step()
        return {"grad_norm": float(grad_norm) if grad_norm is not None else 0.0, "skipped": float(not ok)}


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
    return Engine(policy=policy, ddp=ddp, optimizer=optimizer, state=state)


LossFn = Callable[[torch.Tensor, torch.Tensor, PackedMicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""loss_fn(logprobs [1, T] fp32, entropy [1, T] fp32, micro-batch) -> (this micro-batch's share of the loss,
stats of 0-d tensors)."""


def forward_backward(engine: Engine, micro_batches: Sequence[PackedMicroBatch], loss_fn: Optional[LossFn], *,
                     forward_only: bool = False, temperature: float = 1.0, fused_head: bool = True,
                     entropy_grad: bool = False) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward) of every micro-batch through megatron-core's schedule.

    Last stage: log-probs and entropy of the targets through the fused vocab-parallel head (or the full
    vocab-parallel logits with fused_head=False), then `loss_fn`. Returns the last stage's per-micro-batch
    stats ({"logprobs", "entropy"} [1, T] plus loss_fn's) in order; [] on other stages.
    Collectives: the schedule's P2P on the pipeline, TP all-reduces inside the model and the head ops,
    DDP's grad reduce over DP (overlapped) and finalize_model_grads.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaent.ops import fused_head_logprobs_entropy, vocab_parallel_logprobs_entropy

    policy, st = engine.policy, engine.state
    mbs = [mb.to(st.device) for mb in micro_batches]
    n = len(mbs)
    scale = float(n * st.dp)
    grp = st.tp_group if st.tp > 1 else None
    it = iter(mbs)
    out: list[dict[str, torch.Tensor]] = []

    def forward_step(data_iterator, model):
        del model  # the DDP wrapper of policy.model; the schedule set its input tensor
        mb = next(data_iterator)
        psp = mb.packed_seq_params()
        ids = mb.tokens if st.is_first_stage else None
        if not st.is_last_stage:
            return policy(ids, packed_seq_params=psp), lambda t: (t.sum() * 0, {})
        if fused_head:
            h = policy.final_hidden(ids, packed_seq_params=psp)
            lp, ent = fused_head_logprobs_entropy(h, policy.head_weight, mb.targets, grp, temperature=temperature,
                                                  vocab_size=policy.vocab_size, entropy_grad=entropy_grad)
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
    longest = max(int(mb.tokens.shape[1]) for mb in mbs)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=it, model=[engine.ddp],
                                num_microbatches=n, seq_length=longest, micro_batch_size=1,
                                forward_only=forward_only)
    return out
