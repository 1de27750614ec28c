"""`SGLangClient`: the rollout engine over HTTP, for `megaent serve` and SGLang servers alike.

- One `/generate` request per prompt (carrying all n samples, `return_logprob`),
  at most `max_concurrency` in flight (a semaphore), each sent to the healthy
  server with the fewest requests in flight.
- A connection failure, a broken response or an HTTP 5xx marks that server
  unhealthy and moves the request to another one; an unhealthy server is
  probed again (`GET /health_generate`) after `reprobe_s`. HTTP 400 is the
  caller's error and is raised at once. When no server is healthy the client
  keeps probing until `timeout_s` runs out, then raises `RolloutError`.
- `generate(prompts, params)` is the synchronous `RolloutEngine` method;
  `agenerate` is the same for callers that already run an event loop.
- With `params.seed`, prompt i is sent `sampling_seed = seed + i`, so a
  `megaent serve` answer does not depend on which server took the prompt.
- `api_key` (default $MEGAENT_API_KEY) is sent as `Authorization: Bearer KEY`,
  SGLang's `--api-key` convention, which `megaent serve` shares.
- `sync_weights_from_disk` is the sequence SGLang expects around a weight
  sync (slime's): POST /pause_generation (mode "retract": running requests go
  back to the queue, nothing is lost), /flush_cache, /update_weights_from_disk,
  and always /continue_generation.
- `release_memory` / `resume_memory`: SGLang's /release_memory_occupation and
  /resume_memory_occupation on every server (colocated rollouts,
  rollout.colocate).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import httpx

from megaent.rollout.engine import check_prompts
from megaent.rollout.protocol import parse_sample
from megaent.rollout.types import RolloutError, Sample, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class ServerSlot:
    url: str
    in_flight: int = 0
    healthy: bool = True
    unhealthy_since: float = 0.0
    last_error: str = ""
    served: int = 0
    probing: Optional[asyncio.Task] = field(default=None, repr=False)


class _Retry(Exception):
    pass


class SGLangClient:
    """Async HTTP client over several SGLang-compatible servers; see the module docstring."""

    def __init__(self, urls: Sequence[str], *, max_concurrency: int = 64, timeout_s: float = 600.0,
                 connect_timeout_s: float = 5.0, reprobe_s: float = 5.0, max_attempts: Optional[int] = None,
                 api_key: Optional[str] = None) -> None:
        if not urls:
            raise RolloutError("rollout.urls is empty: give at least one server URL, e.g. http://127.0.0.1:30000")
        self.servers = [ServerSlot(u.rstrip("/")) for u in urls]
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reprobe_s = reprobe_s
        self.max_attempts = max_attempts or 2 * len(urls) + 3
        self.api_key = api_key if api_key is not None else os.environ.get("MEGAENT_API_KEY") or None

    # ------------------------------------------------------------ RolloutEngine
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        """Synchronous `RolloutEngine.generate` (runs its own event loop)."""
        return asyncio.run(self.agenerate(prompts, params))

    async def agenerate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        ids = check_prompts(prompts)
        sem = asyncio.Semaphore(self.max_concurrency)
        async with self._http() as http:
            async def one(i: int, p: list[int]) -> list[Sample]:
                async with sem:
                    return await self._generate_prompt(http, i, p, params)
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(ids))))

    # ------------------------------------------------------------ server control
    def update_weights_from_disk(self, path: str, *, weight_version: Optional[str] = None,
                                 handshake: bool = True) -> list[dict]:
        """Reload every server from `path`; raises RolloutError unless all succeed.

        handshake=True (what the trainer uses): SGLang's pause / flush / update / continue sequence
        (`sync_weights_from_disk`); False: the bare POST /update_weights_from_disk."""
        if handshake:
            return self.sync_weights_from_disk(path, weight_version=weight_version)
        body: dict[str, Any] = {"model_path": str(path)}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return asyncio.run(self._broadcast("/update_weights_from_disk", body))

    def flush_cache(self) -> None:
        asyncio.run(self._broadcast("/flush_cache", None))

    def pause_generation(self, mode: str = "retract") -> None:
        """POST /pause_generation on every server (mode: "abort" | "retract" | "in_place", SGLang's)."""
        asyncio.run(self._broadcast("/pause_generation", {"mode": mode}))

    def continue_generation(self) -> None:
        asyncio.run(self._broadcast("/continue_generation", {}))

    def release_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        """POST /release_memory_occupation on every server (tags: "weights", "kv_cache", "cuda_graph"; None = all):
        a colocated trainer frees the servers' GPU memory before its update."""
        asyncio.run(self._broadcast("/release_memory_occupation", {"tags": list(tags) if tags else None}))

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        """POST /resume_memory_occupation on every server (None = all; SGLang's order around a sync: "weights",
        then the update, then "kv_cache")."""
        asyncio.run(self._broadcast("/resume_memory_occupation", {"tags": list(tags) if tags else None}))

    def sync_weights_from_disk(self, path: str, *, weight_version: Optional[str] = None) -> list[dict]:
        """pause (retract) -> flush_cache -> update_weights_from_disk -> continue, on every server."""
        self.pause_generation("retract")
        try:
            self.flush_cache()
            return self.update_weights_from_disk(path, weight_version=weight_version, handshake=False)
        finally:
            self.continue_generation()

    def health(self) -> list[bool]:
        """GET /health_generate on every server (also refreshes the healthy flags)."""
        async def run() -> list[bool]:
            async with self._http() as http:
                return list(await asyncio.gather(*(self._probe(http, s) for s in self.servers)))
        return asyncio.run(run())

    # ------------------------------------------------------------ internals
    def _http(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_concurrency + len(self.servers), max_keepalive_connections=None)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s), limits=limits,
                                 headers=headers)

    def _body(self, i: int, prompt: list[int], params: SamplingParams) -> dict:
        sp: dict[str, Any] = {"n": params.n, "max_new_tokens": params.max_new_tokens,
                              "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                              "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
                              "skip_special_tokens": False, "no_stop_trim": True}
        if params.seed is not None:
            sp["sampling_seed"] = params.seed + i
        for key, neutral in (("min_p", 0.0), ("repetition_penalty", 1.0), ("frequency_penalty", 0.0),
                             ("presence_penalty", 0.0)):
            if getattr(params, key) != neutral:
                sp[key] = getattr(params, key)
        if params.logit_bias:
            sp["logit_bias"] = {str(t): v for t, v in params.logit_bias}
        return {"input_ids": prompt, "sampling_params": sp, "return_logprob": True}

    async def _generate_prompt(self, http: httpx.AsyncClient, i: int, prompt: list[int],
                               params: SamplingParams) -> list[Sample]:
        out, server = await self._post(http, "/generate", self._body(i, prompt, params))
        items = out if isinstance(out, list) else [out]
        if len(items) != params.n:
            raise RolloutError(f"{server}: asked for n={params.n} samples of prompt {i}, got {len(items)}")
        samples = [parse_sample(o, prompt) for o in items]
        for s in samples:
            s.meta["server"] = server
        return samples

    async def _pick(self, http: httpx.AsyncClient, deadline: float) -> ServerSlot:
        while True:
            now = time.monotonic()
            for s in self.servers:
                if not s.healthy and now - s.unhealthy_since >= self.reprobe_s and (s.probing is None or
                                                                                   s.probing.done()):
                    s.probing = asyncio.create_task(self._probe(http, s))
            healthy = [s for s in self.servers if s.healthy]
            if healthy:
                return min(healthy, key=lambda s: s.in_flight)
            if now > deadline:
                errs = "; ".join(f"{s.url}: {s.last_error}" for s in self.servers)
                raise RolloutError(f"no healthy rollout server after {self.timeout_s:.0f} s ({errs}); check the "
                                   "server logs, or start servers (megaent serve / SGLang)")
            await asyncio.sleep(min(0.2, self.reprobe_s))

    async def _probe(self, http: httpx.AsyncClient, s: ServerSlot) -> bool:
        try:
            r = await http.get(s.url + "/health_generate", timeout=self.connect_timeout_s + 20)
            ok = r.status_code == 200
        except httpx.HTTPError as e:
            ok, s.last_error = False, f"{type(e).__name__}: {e}"
        if ok and not s.healthy:
            log.info("rollout server %s is healthy again", s.url)
        s.healthy = ok
        if not ok:
            s.unhealthy_since = time.monotonic()
        return ok

    def _mark_dead(self, s: ServerSlot, why: str) -> None:
        if s.healthy:
            log.warning("rollout server %s marked unhealthy: %s", s.url, why)
        s.healthy, s.unhealthy_since, s.last_error = False, time.monotonic(), why

    async def _post(self, http: httpx.AsyncClient, path: str, body: Any) -> tuple[Any, str]:
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(self.max_attempts):
            s = await self._pick(http, deadline)
            s.in_flight += 1
            try:
                r = await http.post(s.url + path, json=body)
                if r.status_code >= 500:
                    raise _Retry(f"HTTP {r.status_code}: {r.text[:200]}")
                if r.status_code >= 400:
                    raise RolloutError(f"{s.url}{path} rejected the request (HTTP {r.status_code}): {r.text[:500]}")
                s.served += 1
                return r.json(), s.url
            except (httpx.TransportError, _Retry, ValueError) as e:  # ValueError: a truncated JSON body
                self._mark_dead(s, f"{type(e).__name__}: {e}")
            finally:
                s.in_flight -= 1
        raise RolloutError(f"{path} failed on {self.max_attempts} attempts; last errors: "
                           + "; ".join(f"{s.url}: {s.last_error}" for s in self.servers))

    async def _broadcast(self, path: str, body: Any) -> list[dict]:
        async with self._http() as http:
            async def one(s: ServerSlot) -> dict:
                try:
                    r = await http.post(s.url + path, json=body)
                except httpx.HTTPError as e:
                    raise RolloutError(f"{s.url}{path}: {type(e).__name__}: {e}") from e
                try:
                    out = r.json()
                except ValueError:
                    out = {"success": r.status_code == 200, "message": r.text}
                if r.status_code != 200 or (isinstance(out, dict) and out.get("success") is False):
                    raise RolloutError(f"{s.url}{path} failed (HTTP {r.status_code}): {out}")
                return out
            return list(await asyncio.gather(*(one(s) for s in self.servers)))
