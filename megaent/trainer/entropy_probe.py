"""The exact entropy-change probe of one RL step (issue: the entropy mechanism, measured exactly).

Before the step's first update the probe samples up to `budget` response positions of this DP rank's
micro-batches (`megaent.ops.entropy_change.sample_positions`, the same on every TP rank), keeps the final
hidden states there (the fused head's input, captured by `forward_backward`'s `on_hidden` hook of a forward
the trainer runs anyway) and a copy of the LM-head shard; after the last update it captures the hidden states
at the same positions again. `result()` then gives, over all DP ranks, the first-order prediction
-mean Cov_{pi_old}(log pi_old, dz) and the measured entropy change on exactly those positions
(`megaent.trainer.dynamics.exact_dynamics_stats`), broadcast from the last pipeline stage.
Cost: a copy of the head shard (Vl x H), 2 x budget hidden rows, and the vocab-chunked op (2 TP all-reduces).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.parallel.state import ParallelState
from megaent.trainer.batching import MicroBatch


class EntropyProbe:
    def __init__(self, policy, state: ParallelState, micro_batches: Sequence[MicroBatch], *, budget: int,
                 seed: int, temperature: float) -> None:
        from megaent.ops.entropy_change import sample_positions

        t0 = time.monotonic()
        self.seconds = 0.0  # the probe's own time (its sampling and copies here, the op in result())
        self.policy, self.state, self.temperature = policy, state, temperature
        self.active = state.is_last_stage
        self.h: dict[str, dict[int, torch.Tensor]] = {"old": {}, "new": {}}
        if not self.active:
            return
        masks = [mb.mask.reshape(-1) for mb in micro_batches]
        gen = torch.Generator(device=state.device).manual_seed(seed)
        idx, self.valid = sample_positions(torch.cat(masks), budget, gen)
        self.local: list[torch.Tensor] = []  # per micro-batch: its sampled positions, in idx order
        start = 0
        for m in masks:
            inside = (idx >= start) & (idx < start + m.numel())
            self.local.append(idx[inside] - start)
            start += m.numel()
        self.w_old = policy.head_weight.detach().clone()
        self.seconds += time.monotonic() - t0

    def hook(self, which: str) -> Optional[Callable[[int, torch.Tensor], None]]:
        """`on_hidden` callback that keeps the sampled rows of micro-batch k's final hidden states [T, H]."""
        if not self.active:
            return None
        store = self.h[which]

        def keep(k: int, hidden: torch.Tensor) -> None:
            store[k] = hidden[self.local[k]]  # a gathered copy

        return keep

    def result(self) -> dict[str, float]:
        """{"pred_dH", "dH", "exact_second", "probe_time_s"} on every rank (one host sync); needs both hooks to
        have run. probe_time_s: the probe's own time (the forwards it reads hidden states from are the step's)."""
        from megaent.ops.entropy_change import entropy_change
        from megaent.trainer.dynamics import exact_dynamics_stats

        t0 = time.monotonic()
        st = self.state
        out = torch.zeros(3, dtype=torch.float64, device=st.device)
        if self.active:
            order = sorted(self.h["old"])
            if order != sorted(self.h["new"]) or len(order) != len(self.local):
                raise RuntimeError("entropy probe: hidden states of some micro-batches were not captured")
            h0 = torch.cat([self.h["old"][k] for k in order])
            h1 = torch.cat([self.h["new"][k] for k in order])
            ch = entropy_change(h0, h1, self.w_old, self.policy.head_weight.detach(),
                                st.tp_group if st.tp > 1 else None, vocab_start=self.policy.vocab_range[0],
                                vocab_size=self.policy.vocab_size, temperature=self.temperature)
            stats = exact_dynamics_stats(ch.cov, ch.entropy_old, ch.entropy_new, self.valid,
                                         st.dp_group if st.dp > 1 else None, second=ch.second)
            out = torch.stack([stats["exact_pred_dH"], stats["exact_dH"], stats["exact_second"]]).to(torch.float64)
        if st.pp > 1:
            dist.broadcast(out, src=st.pp_ranks[-1], group=st.pp_group)
        pred, meas, second = out.tolist()  # the host sync: the op's time is all in
        return {"pred_dH": pred, "dH": meas, "exact_second": second,
                "probe_time_s": self.seconds + time.monotonic() - t0}
