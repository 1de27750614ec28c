"""Colocated rollouts: `megaent serve`'s `/release_memory_occupation` and `/resume_memory_occupation`.

SGLang 0.5.23's routes (entrypoints/http_server.py; `ReleaseMemoryOccupationReqInput` /
`ResumeMemoryOccupationReqInput` in managers/io_struct.py): GET or POST with `{"tags": null | [...]}`,
tags among "weights", "kv_cache", "cuda_graph" (null or [] = all); 200 with a `null` body on success,
400 `{"error": {"message"}}` otherwise. A trainer sharing the GPUs with the server releases everything
before its update, then, as slime does, resumes "weights", pushes the new weights, and resumes "kv_cache".

What megaent serve frees:
- "weights": every parameter of the served policy moves to a host copy (`tensor.to("cpu")`) and the
  parameter points at empty storage; resume copies the host copy back. On a GPU this frees the weights'
  device memory (SGLang's `enable_weights_cpu_backup`); on CPU the host copy *is* the old storage, so
  nothing is freed there and the route only proves the protocol. The decode runner (packed weights) is
  dropped with them and rebuilt at the next decode.
- "kv_cache": megaent serve keeps no KV cache between batches (each decode allocates its own), so this
  frees the recorded activation tapes and their pool, and returns cached device blocks to the driver.
- "cuda_graph": megaent serve captures none; accepted and ignored.

While anything is released the batcher is paused (queued requests wait, `/health_generate` answers 200
without decoding), and the routes that need the weights answer 400 naming the fix: generation (native and
OpenAI) while weights or kv_cache are released; weight updates and `/get_weights_by_name` while the weights
are released (resume "weights" first, SGLang's order). Departure from SGLang: resuming a tag that is not
released is a no-op, not an error, so a trainer that restarts can always resume.

The engine-side ops (`MEMORY_OPS`) run in the batcher's engine thread on every TP rank (the TP command bus).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from aiohttp import web

from megaent.rollout.protocol import BadRequest, error_body
from megaent.rollout.serve_context import ServeContext, read_json

log = logging.getLogger(__name__)
TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES
GENERATE_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
WEIGHT_ROUTES = ("/update_weights_from_disk", "/update_weights_from_distributed", "/init_weights_update_group",
                 "/begin_weight_update", "/end_weight_update", "/get_weights_by_name")


@dataclass
class _Offload:
    """One engine's released state: the host copies of its parameters and the policy they belong to."""

    host: dict[str, torch.Tensor] = field(default_factory=dict)
    policy: Any = None


_OFFLOADS: "weakref.WeakKeyDictionary[Any, _Offload]" = weakref.WeakKeyDictionary()


def parse_tags(body: Any) -> list[str]:
    """SGLang's `tags` field -> the tags to act on (None / [] = all)."""
    if not isinstance(body, dict):
        raise BadRequest("request body: expected a JSON object like {\"tags\": [\"weights\"]} (or none)")
    tags = body.get("tags")
    if tags is None or tags == []:
        return list(TAGS)
    if not isinstance(tags, list) or any(t not in TAGS for t in tags):
        raise BadRequest(f"tags={tags!r:.80}: must be null (all) or a list of {list(TAGS)}")
    return list(dict.fromkeys(tags))


def device_bytes(engine: Any) -> int:
    """Bytes of the served policy's parameters (0 once the weights are released)."""
    return sum(p.numel() * p.element_size() for p in engine.policy.parameters())


def _drop_runner(engine: Any) -> None:
    engine._runner, engine._runner_of = None, None  # its packed weights; rebuilt for the policy at the next decode


@torch.no_grad()
def op_release(engine: Any, tags: list[str]) -> int:
    """Free what `tags` name (see the module docstring); returns the parameter bytes released."""
    freed = 0
    if "kv_cache" in tags:
        engine.clear_tapes()
        engine._tape_pool = None
    off = _OFFLOADS.setdefault(engine, _Offload())
    if "weights" in tags and off.policy is None:
        for name, p in engine.policy.named_parameters():
            freed += p.numel() * p.element_size()
            off.host[name] = p.data.to("cpu")
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        off.policy = engine.policy
        _drop_runner(engine)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed


@torch.no_grad()
def op_resume(engine: Any, tags: list[str]) -> int:
    """Bring back what `tags` name; returns the parameter bytes restored. The KV cache needs nothing here
    (each decode allocates its own)."""
    off = _OFFLOADS.get(engine)
    restored = 0
    if "weights" in tags and off is not None and off.policy is not None:
        if off.policy is engine.policy:
            params = dict(engine.policy.named_parameters())
            for name, host in off.host.items():
                params[name].data = host.to(params[name].device)
                restored += host.numel() * host.element_size()
        off.host, off.policy = {}, None
        _drop_runner(engine)
    return restored


MEMORY_OPS: dict[str, Callable[..., Any]] = {"memory_release": op_release, "memory_resume": op_resume}
"""Engine ops of this module, by name (the TP command bus of megaent.rollout.server runs them)."""


@dataclass
class MemoryState:
    """Which tags are released on this server (rank 0's view; every TP rank acts on the same calls)."""

    released: set = field(default_factory=set)

    def refusal(self, path: str) -> Optional[str]:
        """Why `path` cannot be served now, or None."""
        if path in GENERATE_ROUTES and self.released & {"weights", "kv_cache"}:
            return (f"{path}: this server's memory is released ({sorted(self.released)}); POST "
                    "/resume_memory_occupation (tags null = all) before generating")
        if path in WEIGHT_ROUTES and "weights" in self.released:
            return (f"{path}: this server's weights are released; POST /resume_memory_occupation with "
                    "{\"tags\": [\"weights\"]} first (SGLang's order: resume weights, update, resume kv_cache)")
        return None


def add_memory_routes(app: web.Application, ctx: ServeContext) -> None:
    """The two routes, and a middleware refusing what needs released memory (call before the app starts)."""
    batcher, mem = ctx.batcher, MemoryState()
    app["memory"] = mem

    @web.middleware
    async def refuse_released(request: web.Request, handler: Callable) -> web.StreamResponse:
        why = mem.refusal(request.path) if mem.released else None
        if why is not None:
            return web.json_response(error_body(why), status=400)
        return await handler(request)

    async def tags_of(request: web.Request) -> list[str]:
        return parse_tags(await read_json(request))  # no body (a GET): {} = all tags

    async def release(request: web.Request) -> web.Response:
        try:
            tags = await tags_of(request)
        except BadRequest as e:
            return web.json_response(error_body(str(e)), status=400)
        batcher.pause()  # queued requests wait for the resume; the running batch finishes first
        await batcher.idle()
        try:
            freed = await batcher.run_exclusive(ctx.call, "memory_release", tags)
        except Exception as e:  # nothing was released on this rank when the host copy failed
            log.exception("release_memory_occupation failed")
            return web.json_response(error_body(f"release_memory_occupation failed: {e}"), status=400)
        mem.released |= set(tags)
        log.info("released %s (%.1f MiB of weights)", sorted(tags), freed / 2**20)
        return web.json_response(None)

    async def resume(request: web.Request) -> web.Response:
        try:
            tags = await tags_of(request)
        except BadRequest as e:
            return web.json_response(error_body(str(e)), status=400)
        try:
            await batcher.run_exclusive(ctx.call, "memory_resume", tags)
        except Exception as e:
            log.exception("resume_memory_occupation failed")
            return web.json_response(error_body(f"resume_memory_occupation failed: {e}"), status=400)
        mem.released -= set(tags)
        if not mem.released & {"weights", "kv_cache"}:
            batcher.resume()
        return web.json_response(None)

    app.middlewares.append(refuse_released)
    for path, fn in (("/release_memory_occupation", release), ("/resume_memory_occupation", resume)):
        app.router.add_get(path, fn)
        app.router.add_post(path, fn)
