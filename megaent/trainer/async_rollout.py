"""Asynchronous rollouts (rollout.async_steps=1): step k+1's batch is generated while step k updates.

    step k:  take batch k ──> start batch k+1 (thread, rank 0) ──> update k ──> wait for batch k+1 ──> sync w_k
                              └── HTTP to the servers, rewards, group filter; sampled from w_{k-1} ──┘

The batch of step k+1 is sampled from the weights served when it starts, w_{k-1} (the sync of w_k waits for it,
so no batch mixes two weight versions), and trained at step k+1 on w_k: one step stale (slime's and verl's
one-step-off-policy mode). Its old log-probs are the sampler's own (the behaviour policy), so the PPO ratio
pi_theta / pi_behaviour sees and clips that staleness; `rollout/staleness` (policy versions between sampler and
learner) and each sample's `meta["weight_version"]` record it. The servers are other processes (rollout.engine
http / sglang): only rank 0's thread talks to them, it touches no process group, and the batch reaches the other
ranks with one `broadcast_object_list` when it is taken.

Checkpoints: the prefetched batch is checkpointed with the step that made it (it is complete by then: the sync
waited for it), in the checkpoint's meta.json (`RolloutBatch.to_json`, about 25 bytes per token; fine up to some
million tokens per step), and a resumed run takes it instead of generating it again. Regenerating it would not
be exact: a resumed run's servers hold w_k, not the w_{k-1} the batch was sampled from.
"""
from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.distributed as dist

from megaent.data.group_filter import FillResult
from megaent.data.prompts import Prompt
from megaent.rollout.types import Sample

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """One step's rollouts after rewards and the group filter: what `Trainer.finish_batch` turns into samples."""

    step: int
    fill: FillResult  # groups: [(Prompt, [Sample] * G, [reward] * G)]
    rewards: list[float]  # every sampled response's reward, kept or not (the reward metrics)
    lengths: list[int]
    texts: list[dict]
    timeouts: int
    version: int
    """Weight version the servers held when the batch was sampled (the step of the last sync; 0 = initial)."""
    gen_s: float = 0.0
    """Seconds spent producing it (generation, rewards, filter rounds)."""
    scorer_metrics: dict = field(default_factory=dict)
    prompt_state: Optional[dict] = None
    """The prompt stream's position after it."""

    def to_json(self) -> dict:
        def sample(s: Sample) -> dict:
            return {"p": s.prompt_ids, "o": s.output_ids, "lp": s.logprobs, "f": s.finish_reason,
                    "m": s.matched_stop, "meta": s.meta}
        f = self.fill
        groups = [{"prompt": {"index": p.index, "text": p.text, "ids": list(p.ids), "answer": p.answer},
                   "samples": [sample(s) for s in g], "rewards": list(r)} for p, g, r in f.groups]
        return {"step": self.step, "groups": groups, "rounds": f.rounds, "sampled": f.sampled, "kept": f.kept,
                "full": f.full, "rewards": self.rewards, "lengths": self.lengths, "texts": self.texts,
                "timeouts": self.timeouts, "version": self.version, "gen_s": self.gen_s,
                "scorer_metrics": self.scorer_metrics, "prompt_state": self.prompt_state}

    @classmethod
    def from_json(cls, d: dict) -> "RolloutBatch":
        groups = [(Prompt(index=g["prompt"]["index"], text=g["prompt"]["text"], ids=tuple(g["prompt"]["ids"]),
                          answer=g["prompt"]["answer"]),
                   [Sample(prompt_ids=s["p"], output_ids=s["o"], logprobs=s["lp"], finish_reason=s["f"],
                           matched_stop=s["m"], meta=s["meta"]) for s in g["samples"]], g["rewards"])
                  for g in d["groups"]]
        fill = FillResult(groups, d["rounds"], d["sampled"], d["kept"], full=d["full"])
        return cls(step=d["step"], fill=fill, rewards=d["rewards"], lengths=d["lengths"], texts=d["texts"],
                   timeouts=d["timeouts"], version=d["version"], gen_s=d["gen_s"],
                   scorer_metrics=d["scorer_metrics"], prompt_state=d["prompt_state"])


class Prefetcher:
    """Rank 0's one background producer of the next step's `RolloutBatch`; `take` is collective."""

    def __init__(self, produce: Callable[[int], RolloutBatch], *, rank: int, world_size: int) -> None:
        self.produce, self.rank, self.world_size = produce, rank, world_size
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="megaent-rollout") \
            if rank == 0 else None
        self._pending: Optional[tuple[int, concurrent.futures.Future]] = None

    def start(self, step: int) -> None:
        """Rank 0: begin producing step `step`'s batch from the weights the servers hold now."""
        if self._pool is not None:
            assert self._pending is None, "one batch ahead at most"
            self._pending = (step, self._pool.submit(self.produce, step))

    def wait(self) -> None:
        """Rank 0: block until the pending batch is done (before new weights reach the servers). Its error, if
        any, is raised by `take`, on every rank."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending[1]])

    def put(self, batch: RolloutBatch) -> None:
        """Rank 0: a batch restored from a checkpoint, taken at its step."""
        if self._pool is not None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(batch)
            self._pending = (batch.step, fut)

    def done_batch(self) -> Optional[RolloutBatch]:
        """Rank 0: the pending batch when it is complete (what a checkpoint keeps), else None."""
        if self._pending is None or not self._pending[1].done() or self._pending[1].exception() is not None:
            return None
        return self._pending[1].result()

    def take(self, step: int) -> RolloutBatch:
        """Collective: step `step`'s batch on every rank (rank 0 produces it now when none is pending)."""
        box: list[Any] = [None]
        if self.rank == 0:
            if self._pending is None or self._pending[0] != step:
                self._pending = (step, self._pool.submit(self.produce, step))
            fut = self._pending[1]
            self._pending = None
            try:
                box[0] = fut.result()
            except Exception as e:  # every rank raises the same error instead of waiting in the broadcast
                box[0] = e
        if self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
