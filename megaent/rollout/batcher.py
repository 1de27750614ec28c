"""A small dynamic batcher: requests that arrive within a few milliseconds share one decode.

The HTTP handlers `await batcher.submit(prompts, params)`; one worker task
collects whatever is queued, waits `window_s` for more (up to `max_rows`
sample rows), and runs one `engine.generate_many(jobs)` on a single worker
thread, so the event loop keeps answering health checks meanwhile. Weight
updates go through `run_exclusive`, the same thread, so they never overlap a
decode (SGLang likewise applies `/update_weights_from_disk` between batches).
Each request keeps its own sampling options (the engine takes per-row
tensors) and, with a seed, its own random streams, so batching never changes
a seeded request's samples.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Callable, Optional, Sequence

from megaent.rollout.types import Sample, SamplingParams

log = logging.getLogger(__name__)


class DynamicBatcher:
    """Queue + worker around `run_batch(jobs) -> results` (jobs = [(prompts, params)])."""

    def __init__(self, run_batch: Callable[[list[tuple[list[list[int]], SamplingParams]]], list[list[list[Sample]]]],
                 *, window_s: float = 0.005, max_rows: int = 256) -> None:
        self._run_batch = run_batch
        self.window_s = window_s
        self.max_rows = max_rows
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="megaent-engine")
        self.in_flight = 0
        self.batches_run = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    async def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        assert self._queue is not None, "call start() first"
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.in_flight += 1
        try:
            await self._queue.put(([list(p) for p in prompts], params, fut))
            return await fut
        finally:
            self.in_flight -= 1

    async def run_exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the engine thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: list = []
        while True:
            items = carry or [await self._queue.get()]
            carry = []
            await asyncio.sleep(self.window_s)
            rows = sum(len(p) * prm.n for p, prm, _ in items)
            while not self._queue.empty():
                item = self._queue.get_nowait()
                n = len(item[0]) * item[1].n
                if rows + n > self.max_rows:
                    carry = [item]
                    break
                items.append(item)
                rows += n
            items = [it for it in items if not it[2].done()]  # client went away
            if not items:
                continue
            jobs = [(p, prm) for p, prm, _ in items]
            try:
                results = await loop.run_in_executor(self._thread, self._run_batch, jobs)
            except Exception as e:  # the engine failed: every request in the batch gets the error
                log.exception("generate batch of %d requests failed", len(items))
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches_run += 1
            for (_, _, fut), res in zip(items, results):
                if not fut.done():
                    fut.set_result(res)
