"""A small dynamic batcher: requests that arrive within a few milliseconds share one decode.

The HTTP handlers `await batcher.submit(prompts, params, rids=...)`; one worker
task collects whatever is queued, waits `window_s` for more (up to `max_rows`
sample rows), and runs one `run_batch(jobs)` on a single worker thread, so the
event loop keeps answering health checks meanwhile. Weight updates go through
`run_exclusive`, the same thread, so they never overlap a decode (SGLang
likewise applies `/update_weights_from_disk` between batches). Each request
keeps its own sampling options and, with a seed, its own random streams, so
batching never changes a seeded request's samples.

Failure isolation (issue 21, point 3): when a batch of several requests fails
in the engine, each request is run again on its own, so only the one that
really fails gets the error. Aborts: a request whose client hung up, or that
`/abort_request` / `pause_generation(mode="abort")` named, is dropped from the
queue at once; a running batch whose requests are all gone is stopped between
two decode steps (`should_stop`, polled by the server's engine hook).

Streaming: a request submitted with `on_tokens(i, j, t, token, logprob)` gets each
new token (the t-th) of its prompt i, sample j on the event loop as the engine decodes it
(`engine_step`, the engine's `on_step` hook, runs on the engine thread and
costs one small host copy per step only while a streaming request decodes).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from megaent.rollout.types import Sample, SamplingParams

log = logging.getLogger(__name__)
Jobs = list[tuple[list[list[int]], SamplingParams]]


class RequestAborted(Exception):
    """The request was aborted (client gone, /abort_request, or pause_generation with mode=abort)."""


class DecodeStopped(Exception):
    """Raised inside the engine by the step hook: every request of the running batch is gone."""


@dataclass
class _Item:
    prompts: list[list[int]]
    params: SamplingParams
    fut: asyncio.Future
    rids: frozenset = field(default_factory=frozenset)
    on_tokens: Optional[Callable[[int, int, int, int, float], None]] = None


class DynamicBatcher:
    """Queue + worker around `run_batch(jobs) -> results` (jobs = [(prompts, params)])."""

    def __init__(self, run_batch: Callable[[Jobs], list[list[list[Sample]]]], *, window_s: float = 0.005,
                 max_rows: int = 256) -> None:
        self._run_batch = run_batch
        self.window_s = window_s
        self.max_rows = max_rows
        self._queue: Optional[asyncio.Queue] = None
        self._event_loop: Optional[asyncio.AbstractEventLoop] = None
        self._worker: Optional[asyncio.Task] = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="megaent-engine")
        self._waiting: list[_Item] = []  # queued, not yet decoding
        self._running: list[_Item] = []  # in the decode now
        self._resume = asyncio.Event()
        self._resume.set()
        self.in_flight = 0
        self.batches_run = 0
        self.batches_stopped = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._event_loop = asyncio.get_running_loop()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    # ------------------------------------------------------------ requests
    async def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                     rids: Sequence[str] = (), on_tokens: Optional[Callable[[int, int, int, int, float], None]] = None
                     ) -> list[list[Sample]]:
        """Decode one job; raises RequestAborted if it is aborted, the engine's error if it fails.
        `on_tokens(i, j, t, token, logprob)`: called on the event loop with token t of prompt i's sample j as
        it is decoded."""
        assert self._queue is not None, "call start() first"
        item = _Item([list(p) for p in prompts], params, asyncio.get_running_loop().create_future(), frozenset(rids),
                     on_tokens)
        self.in_flight += 1
        try:
            self._waiting.append(item)
            await self._queue.put(item)
            return await item.fut
        finally:  # a cancelled handler (client hung up) cancels its future: the decode loop sees it
            self.in_flight -= 1
            if not item.fut.done():
                item.fut.cancel()

    def should_stop(self) -> bool:
        """True when no request of the running batch still wants its result (thread-safe read)."""
        running = self._running
        return bool(running) and all(it.fut.done() for it in running)

    def engine_step(self, chunk: list, t: int, tokens: Any, logprobs: Any, lengths: Any) -> None:
        """The engine's `on_step` hook (engine thread): hand step t's tokens to the streaming requests.

        chunk[q] = (job index, prompt index, sample index, ...) of decode row q; a row has a token of step t
        where lengths[q] == t + 1."""
        running, loop = self._running, self._event_loop
        if loop is None or not any(it.on_tokens is not None for it in running):
            return
        toks, lps, lens = tokens.tolist(), logprobs.tolist(), lengths.tolist()
        for q, row in enumerate(chunk):
            it = running[row[0]]
            if it.on_tokens is not None and lens[q] == t + 1 and not it.fut.done():
                loop.call_soon_threadsafe(it.on_tokens, row[1], row[2], t, toks[q], lps[q])

    def abort(self, *, rid: Optional[str] = None, abort_all: bool = False) -> int:
        """Abort the queued and running requests carrying `rid` (or all); returns how many."""
        hit = 0
        for it in self._waiting + self._running:
            if not it.fut.done() and (abort_all or (rid is not None and rid in it.rids)):
                it.fut.set_exception(RequestAborted("aborted by request"))
                hit += 1
        return hit

    def pause(self) -> None:
        """Hold queued requests (the running batch finishes) until `resume()`."""
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    async def idle(self) -> None:
        """Wait until no batch is decoding."""
        while self._running:
            await asyncio.sleep(0.005)

    async def run_exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the engine thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------ worker
    def _take(self, first: _Item) -> tuple[list[_Item], Optional[_Item]]:
        """`first` plus what else is queued, up to max_rows rows; the item that did not fit is carried."""
        assert self._queue is not None
        items, rows = [first], len(first.prompts) * first.params.n
        while not self._queue.empty():
            item = self._queue.get_nowait()
            n = len(item.prompts) * item.params.n
            if rows + n > self.max_rows:
                return items, item
            items.append(item)
            rows += n
        return items, None

    async def _loop(self) -> None:
        assert self._queue is not None
        carry: Optional[_Item] = None
        while True:
            first = carry or await self._queue.get()
            await asyncio.sleep(self.window_s)
            await self._resume.wait()
            items, carry = self._take(first)
            for it in items:
                self._waiting.remove(it)
            items = [it for it in items if not it.fut.done()]  # client went away or aborted
            if items:
                await self._run(items)

    async def _run(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self._running = items
        try:
            results = await loop.run_in_executor(self._thread, self._run_batch, [(it.prompts, it.params)
                                                                                 for it in items])
        except DecodeStopped:
            self.batches_stopped += 1
            log.info("stopped a decode of %d requests: none of them is waiting for it any more", len(items))
            return
        except Exception as e:
            if len(items) == 1:
                log.error("generate request failed: %s", e)
                if not items[0].fut.done():
                    items[0].fut.set_exception(e)
                return
            # One bad request must not fail the others: run each on its own (issue 21, point 3).
            log.warning("a batch of %d requests failed (%s); running each alone", len(items), e)
            for it in items:
                if not it.fut.done():
                    await self._run([it])
            return
        finally:
            self._running = []
        self.batches_run += 1
        for it, res in zip(items, results):
            if not it.fut.done():
                it.fut.set_result(res)
