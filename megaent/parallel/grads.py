"""Gradient reductions after the backward pass: data-parallel SUM and the tied-embedding all-reduce.

Convention: the RL loss on every rank is already divided by the GLOBAL
denominator of the mini-batch (e.g. the number of valid tokens over all DP
ranks and micro-batches), so the gradient of the mini-batch loss is the SUM of
the per-rank gradients: we all-reduce with SUM and never divide by the DP size.
(Averaging would be right only if each rank's loss were normalised by its own
token count, which makes the update depend on how tokens are split.)

Buckets: grads are copied into flat fp32-or-native buffers of about
`bucket_mb` MiB (one dtype per bucket), all-reduced, and copied back, so the
number of collectives is about total_grad_bytes / bucket_bytes instead of one
per parameter (the idea of megatron-core's and DDP's gradient buckets; no
overlap with backward here, which would need hooks and only pays on GPU).

Tied embeddings with PP > 1 (megatron-core convention): the first stage holds
the input embedding and the last stage a copy used as the output head; after
backward both must hold the sum of the two grads, so the copies stay equal
after the step. Parameters carrying `shared_embedding = True` are those copies.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.parallel.state import ParallelState


def is_tied_embedding(param: torch.Tensor) -> bool:
    """True for a copy of the word embedding shared between the first and last pipeline stage."""
    return bool(getattr(param, "shared_embedding", False))


def _ensure_grads(params: Sequence[torch.nn.Parameter]) -> None:
    # A parameter that got no gradient on one rank (an empty micro-batch, an unused branch) must still take part,
    # or the buckets would differ between ranks and the collectives would not line up.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _buckets(params: Sequence[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    out: list[list[torch.nn.Parameter]] = []
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        cur, size = [], 0
        for p in group:
            cur.append(p)
            size += p.grad.numel() * p.grad.element_size()
            if size >= bucket_bytes:
                out.append(cur)
                cur, size = [], 0
        if cur:
            out.append(cur)
    return out


def allreduce_grads(params: Iterable[torch.nn.Parameter], *, group: Optional[dist.ProcessGroup],
                    bucket_mb: float = 25.0) -> int:
    """SUM every param's grad over `group` in flat buckets (in place); returns the number of all-reduces.

    Missing grads become zeros first. Collectives: ceil(bytes / bucket) all-reduces on `group`.
    """
    params = [p for p in params if p.requires_grad]
    if group is None or dist.get_world_size(group) == 1 or not params:
        return 0
    _ensure_grads(params)
    n = 0
    for bucket in _buckets(params, max(1, int(bucket_mb * 2**20))):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, group=group)
        for p, chunk in zip(bucket, flat.split([p.grad.numel() for p in bucket])):
            p.grad.copy_(chunk.view_as(p.grad))
        n += 1
    return n


def allreduce_tied_embedding_grads(params: Iterable[torch.nn.Parameter], *, state: ParallelState) -> int:
    """SUM the grads of the tied embedding copies over `state.embedding_group` (first + last stage, PP > 1).

    No-op for PP = 1 (one parameter object serves both) and on middle stages.
    Collectives: 1 all-reduce on embedding_group when there is a tied copy here.
    """
    if state.pp == 1 or not (state.is_first_stage or state.is_last_stage):
        return 0
    tied = [p for p in params if p.requires_grad and is_tied_embedding(p)]
    if not tied:
        return 0
    return allreduce_grads(tied, group=state.embedding_group, bucket_mb=1e9)


def reduce_gradients(model: torch.nn.Module, *, state: ParallelState, bucket_mb: float = 25.0) -> dict[str, int]:
    """All the reductions a step needs: DP SUM (bucketed), then the tied-embedding SUM; returns collective counts."""
    params = [p for p in model.parameters() if p.requires_grad]
    dp = allreduce_grads(params, group=state.dp_group, bucket_mb=bucket_mb)
    tied = allreduce_tied_embedding_grads(params, state=state)
    return {"dp_allreduces": dp, "tied_allreduces": tied}
