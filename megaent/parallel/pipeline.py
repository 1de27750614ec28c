"""Pipeline schedules over the PP group: 1F1B for training and a forward-only pass.

Why our own schedule: megatron-core's schedules (`forward_backward_pipelining_
without_interleaving`) call CUDA streams/events and cannot run on CPU ranks;
`torch.distributed.pipelining` runs on gloo, but it infers one static
activation shape for all micro-batches and passes only `(output, target)` to
the loss, while our packed micro-batches change length every time and the loss
needs per-token RL tensors (advantages, masks, old log-probs, Clip-Cov
selection). Here every rank of a pipeline holds the same micro-batch metadata
(the batch is scattered per DP rank and replicated over TP and PP), so each
stage knows the shape `[B, S, H]` of what it receives and only hidden states
(forward) and their gradients (backward) travel, point to point.

1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
GPU Clusters Using Megatron-LM", PipeDream-Flush; ordering as in megatron-core's
non-interleaved schedule, written anew): stage r runs min(pp - r - 1, M)
warm-up forwards, then alternates one forward / one backward, then drains the
remaining backwards, so at most pp - r activations are alive. Deadlock-free on
gloo because every step that both sends and receives posts both operations
together (`batch_isend_irecv`) before waiting, and forward (r -> r+1) and
backward (r+1 -> r) messages between two stages travel in opposite
directions, so they never match each other.

Collectives: point-to-point on the default group only (global ranks from
`state.pp_ranks`); per micro-batch one send/recv of [B, S, H] forward and one
backward between neighbouring stages.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.parallel.state import ParallelState

# stage_fn(mb, hidden_in or None on the first stage) -> hidden [B, S, H] (non-last) or the stage output (last).
StageFn = Callable[[Any, Optional[torch.Tensor]], torch.Tensor]
# loss_fn(last_stage_output, mb) -> (0-d loss to differentiate, stats dict of 0-d tensors)
LossFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, dict]]


def _hidden_shape(mb: Any, hidden_size: int) -> tuple[int, int, int]:
    b, s = mb.input_ids.shape
    return b, s, hidden_size


class _P2P:
    """Send/receive hidden states and gradients to the neighbouring stages (global ranks)."""

    def __init__(self, state: ParallelState, *, hidden_size: int, dtype: torch.dtype) -> None:
        self.state, self.hidden_size, self.dtype = state, hidden_size, dtype
        self.prev = state.prev_stage_rank() if not state.is_first_stage else None
        self.next = state.next_stage_rank() if not state.is_last_stage else None

    def _run(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[Any, int]]) -> list[torch.Tensor]:
        ops, bufs = [], []
        for mb, peer in recvs:
            buf = torch.empty(_hidden_shape(mb, self.hidden_size), dtype=self.dtype, device=self.state.device)
            ops.append(dist.P2POp(dist.irecv, buf, peer))
            bufs.append(buf)
        for t, peer in sends:
            ops.append(dist.P2POp(dist.isend, t.detach().to(self.dtype).contiguous(), peer))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return bufs

    def exchange(self, *, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                 recv_prev: Any = None, recv_next: Any = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Post the wanted sends/recvs together; returns (from_prev, from_next). `recv_*` are micro-batches (shape)."""
        sends, recvs, slots = [], [], []
        if send_next is not None and self.next is not None:
            sends.append((send_next, self.next))
        if send_prev is not None and self.prev is not None:
            sends.append((send_prev, self.prev))
        if recv_prev is not None and self.prev is not None:
            recvs.append((recv_prev, self.prev))
            slots.append("prev")
        if recv_next is not None and self.next is not None:
            recvs.append((recv_next, self.next))
            slots.append("next")
        got = dict(zip(slots, self._run(sends, recvs)))
        return got.get("prev"), got.get("next")


def forward_backward_1f1b(stage_fn: StageFn, micro_batches: Sequence[Any], *, loss_fn: LossFn,
                          state: ParallelState, hidden_size: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Forward and backward of every micro-batch through the pipeline (1F1B); grads accumulate in `.grad`.

    micro_batches: the same list (same shapes) on every stage, each with
    `input_ids [B, S]`. The last stage applies `loss_fn(output, mb)` and calls
    backward on its loss; scale the loss there (e.g. by a global token
    denominator) so that the accumulated grads are what you want.
    Returns the per-micro-batch stats from `loss_fn` on the last stage, [] elsewhere.
    Collectives: P2P with the neighbouring stages only.
    """
    p2p = _P2P(state, hidden_size=hidden_size, dtype=dtype)
    m = len(micro_batches)
    warm = min(state.pp - state.pp_rank - 1, m)
    steady = m - warm
    alive: deque = deque()  # (input hidden or None, output or loss), oldest first
    stats: list[dict] = []

    def forward(i: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        if x is not None:
            x.requires_grad_(True)
        out = stage_fn(micro_batches[i], x)
        if state.is_last_stage:
            out, st = loss_fn(out, micro_batches[i])
            stats.append(st)
        alive.append((x, out))
        return out

    def backward(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        x, out = alive.popleft()
        if state.is_last_stage:
            out.backward()
        else:
            torch.autograd.backward(out, grad_tensors=grad.to(out.dtype))
        return None if x is None else x.grad

    def send_out(out: torch.Tensor) -> Optional[torch.Tensor]:
        return None if state.is_last_stage else out

    for i in range(warm):
        x, _ = p2p.exchange(recv_prev=micro_batches[i])
        out = forward(i, x)
        p2p.exchange(send_next=send_out(out))
    x = p2p.exchange(recv_prev=micro_batches[warm])[0] if steady > 0 else None
    for j in range(steady):
        i = warm + j  # forward index; backward index is j
        out = forward(i, x)
        _, grad = p2p.exchange(send_next=send_out(out), recv_next=micro_batches[j])
        gx = backward(grad)
        last = j == steady - 1
        x, _ = p2p.exchange(send_prev=gx, recv_prev=None if last else micro_batches[i + 1])
    for j in range(steady, m):
        _, grad = p2p.exchange(recv_next=micro_batches[j])
        gx = backward(grad)
        p2p.exchange(send_prev=gx)
    return stats


def forward_only(stage_fn: StageFn, micro_batches: Sequence[Any], *, output_fn: Callable[[torch.Tensor, Any], Any],
                 state: ParallelState, hidden_size: int, dtype: torch.dtype = torch.float32) -> list[Any]:
    """Forward of every micro-batch without autograd; the last stage returns [output_fn(out, mb)], others [].

    Used for old/reference log-probs and for the global Clip-Cov/KL-Cov
    statistics before the gradient pass. Collectives: P2P forward sends only.
    """
    p2p = _P2P(state, hidden_size=hidden_size, dtype=dtype)
    results = []
    with torch.no_grad():
        for mb in micro_batches:
            x, _ = p2p.exchange(recv_prev=mb)
            out = stage_fn(mb, x)
            if state.is_last_stage:
                results.append(output_fn(out, mb))
            else:
                p2p.exchange(send_next=out)
    return results


def broadcast_from_last_stage(tensors: Optional[list[torch.Tensor]], like: Sequence[torch.Tensor], *,
                              state: ParallelState) -> list[torch.Tensor]:
    """Give every stage the last stage's tensors (same shapes/dtypes as `like`): 1 broadcast on pp_group.

    `tensors` is the list on the last stage (None elsewhere); flattened into one buffer.
    """
    if state.pp == 1:
        return list(tensors)
    numels = [t.numel() for t in like]
    if state.is_last_stage:
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors]) if tensors else torch.zeros(0)
    else:
        flat = torch.empty(sum(numels), dtype=torch.float32, device=state.device)
    flat = flat.to(state.device)
    dist.broadcast(flat, src=state.pp_ranks[-1], group=state.pp_group)
    return [chunk.view_as(t).to(t.dtype) for chunk, t in zip(flat.split(numels), like)]
