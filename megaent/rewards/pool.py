"""Verifier process pool with a hard per-sample timeout.

Each worker is a spawned process that owns one pipe and scores one sample at
a time. The parent hands a sample to an idle worker and gives it `timeout_s`
seconds; a worker that misses its deadline is killed (SIGKILL) and replaced
by a fresh one, and the sample scores 0 and is counted in `timeouts`. This is
why there is no `concurrent.futures.ProcessPoolExecutor` here: it cannot kill
one stuck worker, only abandon the whole pool. A worker first imports its
verifier and reports ready, so import time never counts against a sample.

Usage:
    with RewardPool("math", workers=2, timeout_s=5.0) as pool:
        result = pool.score(responses, answers)   # RewardResult

The deadline holds with any worker count: `workers=0` scores in-process only a verifier that cannot hang (the
synthetic exact checker, `IN_PROCESS_SAFE`); any other verifier, a test double included, still gets one worker
process, since a hang inside one C call (sympy's big integers) stops only when its process is killed. Each
worker's address space is capped (`memory_gib`, RLIMIT_AS): a sample past it raises MemoryError in the worker and
scores 0 as an error. Timeouts, verifier errors and worker crashes are counted per call (`RewardResult`) and in
running totals that `take_metrics` hands to the trainer once per step.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

from megaent.config.schema import RewardConfig
from megaent.rewards.math import score_math
from megaent.rewards.synthetic import score_exact

log = logging.getLogger(__name__)

Scorer = Callable[[str, str, float], "tuple[float, bool]"]


def _warm_math() -> None:
    score_math("\\boxed{\\frac{1}{2}}", "0.5")  # imports math_verify + sympy, warms the parser


SCORERS: dict[str, tuple[Scorer, Optional[Callable[[], None]]]] = {
    "math": (score_math, _warm_math),
    "synthetic": (score_exact, None),
}
"""Verifier by `reward.kind`: (scorer(response, answer, format_reward) -> (reward, format_ok), warm-up)."""
IN_PROCESS_SAFE = {score_exact}
"""Verifiers that run in linear time on their input and may score in-process (`workers=0`) without a deadline."""


@dataclass
class RewardResult:
    """Rewards of one `score` call, in input order."""

    rewards: list[float]
    """Per-sample reward (0 on timeout or verifier error)."""
    format_ok: list[bool]
    """Per-sample: an answer in the expected format was found."""
    timed_out: list[bool] = field(default_factory=list)
    """Per-sample: the verifier ran past timeout_s and its worker was killed."""
    timeouts: int = 0
    """Number of samples that timed out."""
    errors: int = 0
    """Number of samples whose verifier raised (MemoryError past the cap included; scored 0)."""
    crashes: int = 0
    """Number of samples whose worker died while scoring them (a signal, a hard crash; scored 0)."""

    def metrics(self) -> dict[str, float]:
        """Scalar metrics for the trainer's sink."""
        n = max(len(self.rewards), 1)
        return {
            "reward/verifier_timeouts": float(self.timeouts),
            "reward/verifier_errors": float(self.errors),
            "reward/verifier_crashes": float(self.crashes),
            "reward/format_ok": sum(self.format_ok) / n,
        }


def _cap_memory(memory_gib: Optional[float]) -> None:
    if memory_gib:
        limit = int(memory_gib * 2**30)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY and hard < limit
                                                else limit))


def _worker_main(conn: Connection, scorer: Scorer, warm: Optional[Callable[[], None]],
                 memory_gib: Optional[float] = None) -> None:
    _cap_memory(memory_gib)
    if warm is not None:
        warm()
    conn.send(("ready",))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        idx, response, answer, format_reward = msg
        try:
            reward, ok = scorer(response, answer, format_reward)
            conn.send((idx, float(reward), bool(ok), None))
        except Exception as exc:  # a verifier bug (or MemoryError past the cap) must not take the step down
            conn.send((idx, 0.0, False, repr(exc)[:500]))


class _Worker:
    def __init__(self, ctx: Any, scorer: Scorer, warm: Optional[Callable[[], None]],
                 memory_gib: Optional[float]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, scorer, warm, memory_gib), daemon=True)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.task: Optional[int] = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        self.kill()


class RewardPool:
    """Scores (response, ground truth) pairs with a verifier in worker processes.

    Args:
        kind: key of `SCORERS` ("math" | "synthetic"); ignored when `scorer` is given.
        workers: worker processes (0 = in-process for `IN_PROCESS_SAFE` verifiers, else one process).
        timeout_s: per-sample deadline; a late sample scores 0, is counted, and
            its worker is killed and replaced.
        format_reward: added to a sample's reward when its answer form is right.
        scorer: a module-level function (picklable by name) to use instead of
            `SCORERS[kind]`, e.g. a test double.
        start_timeout_s: how long a new worker may take to import its verifier.
        memory_gib: address-space cap of each worker (None = uncapped).
    """

    def __init__(
        self,
        kind: str = "math",
        *,
        workers: int = 2,
        timeout_s: float = 5.0,
        format_reward: float = 0.0,
        scorer: Optional[Scorer] = None,
        start_timeout_s: float = 120.0,
        memory_gib: Optional[float] = RewardConfig.worker_memory_gib,
    ) -> None:
        if scorer is None and kind not in SCORERS:
            raise ValueError(f"reward.kind={kind!r}: unknown verifier; choose one of {sorted(SCORERS)}")
        if workers < 0:
            raise ValueError(f"reward.workers={workers}: must be >= 0 (0 = score in-process)")
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={timeout_s}: must be > 0 seconds")
        if memory_gib is not None and not memory_gib > 0:
            raise ValueError(f"reward.worker_memory_gib={memory_gib}: must be > 0 GiB")
        self._scorer, self._warm = (scorer, None) if scorer is not None else SCORERS[kind]
        if workers == 0 and self._scorer not in IN_PROCESS_SAFE:
            log.info("reward.workers=0: %s still runs in one worker process, so that its %.0f s deadline holds",
                     getattr(self._scorer, "__name__", "the verifier"), timeout_s)
            workers = 1
        self.memory_gib = memory_gib
        self.totals = {"timeouts": 0, "errors": 0, "crashes": 0}
        """Running counts since the last `take_metrics`."""
        self.timeout_s = float(timeout_s)
        self.format_reward = float(format_reward)
        self.start_timeout_s = float(start_timeout_s)
        self.replaced = 0
        """Workers killed and replaced so far (timeouts and deaths)."""
        self._ctx = mp.get_context("spawn")
        self._workers = [self._spawn() for _ in range(workers)]

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RewardPool":
        """The pool `reward.*` asks for."""
        return cls(cfg.kind, workers=cfg.workers, timeout_s=cfg.timeout_s, format_reward=cfg.format_reward,
                          memory_gib=cfg.worker_memory_gib)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._scorer, self._warm, self.memory_gib)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for w in self._workers:
            w.stop()
        self._workers = []

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> RewardResult:
        """Reward of each response against its ground truth; returns within ~timeout_s per sample.

        Raises ValueError when the two lists differ in length, RuntimeError when
        a worker cannot start within start_timeout_s.
        """
        if len(responses) != len(answers):
            raise ValueError(f"score: {len(responses)} responses but {len(answers)} answers; pass one answer per response")
        n = len(responses)
        result = RewardResult([0.0] * n, [False] * n, [False] * n)
        if not self._workers:
            for i in range(n):
                try:
                    result.rewards[i], result.format_ok[i] = self._scorer(responses[i], answers[i],
                                                                          self.format_reward)
                except Exception as exc:  # as in a worker: the sample scores 0 and counts
                    log.warning("verifier raised on sample %d: %r (scored 0)", i, exc)
                    result.errors += 1
        else:
            pending = deque(range(n))
            done = 0
            while done < n:
                self._dispatch(pending, responses, answers)
                done += self._collect(result)
                done += self._reap(result)
        for key in self.totals:
            self.totals[key] += getattr(result, key)
        return result

    def take_metrics(self) -> dict[str, float]:
        """Verifier timeouts, errors and crashes since the last call (the trainer logs them once per step)."""
        out = {f"reward/verifier_{k}": float(v) for k, v in self.totals.items()}
        self.totals = dict.fromkeys(self.totals, 0)
        return out

    def _dispatch(self, pending: deque, responses: Sequence[str], answers: Sequence[str]) -> None:
        for w in self._workers:
            if pending and w.ready and w.task is None:
                i = pending.popleft()
                w.conn.send((i, responses[i], answers[i], self.format_reward))
                w.task, w.deadline = i, time.monotonic() + self.timeout_s

    def _collect(self, result: RewardResult) -> int:
        now = time.monotonic()
        limits = [w.deadline - now for w in self._workers if w.task is not None]
        wait_s = max(0.0, min(limits)) if limits else 0.5
        by_conn = {w.conn: w for w in self._workers}
        finished = 0
        for conn in wait(list(by_conn), timeout=wait_s):
            w = by_conn[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                if not w.ready:  # replacing would only start the same failure again
                    w.proc.join(timeout=5)
                    raise RuntimeError(
                        f"reward worker exited with code {w.proc.exitcode} before it was ready; "
                        "the verifier failed to import or the parent's __main__ cannot be re-imported "
                        "by a spawned process (run from a file, not stdin)"
                    ) from None
                finished += self._replace(w, result, timed_out=False)
                continue
            if msg[0] == "ready":
                w.ready = True
                continue
            i, reward, ok, err = msg
            if err is not None:
                log.warning("verifier raised on sample %d: %s (scored 0)", i, err)
                result.errors += 1
            result.rewards[i], result.format_ok[i] = reward, ok
            w.task = None
            finished += 1
        return finished

    def _reap(self, result: RewardResult) -> int:
        now = time.monotonic()
        finished = 0
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                finished += self._replace(w, result, timed_out=True)
            elif not w.ready and now - w.started > self.start_timeout_s:
                raise RuntimeError(
                    f"reward worker did not start within {self.start_timeout_s:.0f} s; "
                    "check that the verifier imports (math-verify installed?)"
                )
        return finished

    def _replace(self, w: _Worker, result: RewardResult, *, timed_out: bool) -> int:
        """Kill `w`, start a fresh worker in its slot; its sample (if any) scores 0. Returns 1 if a sample ended."""
        i = w.task
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()
        self.replaced += 1
        if i is None:
            return 0
        result.rewards[i], result.format_ok[i] = 0.0, False
        if timed_out:
            result.timed_out[i] = True
            result.timeouts += 1
        else:
            log.warning("reward worker died (exit code %s) while scoring sample %d (scored 0)",
                        w.proc.exitcode, i)
            result.crashes += 1
        return 1
