"""SGLang's native routes of `megaent serve` (SGLang 0.5.23 entrypoints/http_server.py is the reference).

POST|PUT /generate (SSE with `stream`), GET /health, /health_generate, /model_info, /server_info (and the
deprecated /get_model_info, /get_server_info), GET|POST /flush_cache, POST /update_weights_from_disk,
/update_weight_version, /pause_generation, /continue_generation, /abort_request, and the weight sync over a
process group: /init_weights_update_group, /destroy_weights_update_group, /begin_weight_update,
/update_weights_from_distributed, /end_weight_update (megaent.rollout.dist_update), and GET|POST
/get_weights_by_name (SGLang's test route: rank 0's shard of one HF tensor, truncated rows). Answer shapes follow
SGLang's; `/update_weights_from_disk` checks and rolls back (megaent.rollout.weight_update), the distributed
update checks a whole request (or session) before any weight changes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from aiohttp import web

from megaent.rollout.dist_update import DIST_OPS, parse_dtype, weights_by_name
from megaent.rollout.generation import format_result, run_generate, stream_generate
from megaent.rollout.protocol import BadRequest, error_body, get_bool, get_int, parse_generate
from megaent.rollout.serve_context import ServeContext, bad_request, read_json, send_sse
from megaent.rollout.types import SamplingParams
from megaent.rollout.weight_update import WeightMismatch, check_compatible

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 20.0


def add_native_routes(app: web.Application, ctx: ServeContext) -> None:
    batcher, tok = ctx.batcher, ctx.tokenizer

    async def generate(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        try:
            req = parse_generate(await read_json(request), tokenizer=tok, vocab_size=ctx.engine.vocab_size,
                                 context_len=ctx.context_len)
        except BadRequest as e:
            return bad_request(str(e))
        wv = ctx.info["weight_version"]
        if req.stream:
            async def events() -> AsyncIterator[dict]:
                chunks = stream_generate(req, batcher=batcher, tokenizer=tok, eos_ids=ctx.engine.eos_token_ids,
                                         score=ctx.score)
                try:
                    async for c in chunks:
                        ev = format_result(c.result, req, req.rids[c.index], tokenizer=tok,
                                           weight_version=ctx.info["weight_version"], started=started, done=c.done,
                                           text=c.text)
                        if not req.single:
                            ev["index"] = c.index
                        yield ev
                except Exception as e:  # the stream has begun: SGLang sends the error as the last event
                    log.exception("generate failed")
                    yield error_body(f"generation failed: {e}", 500)
                finally:
                    await chunks.aclose()  # a client that hung up: its decode is aborted
            return await send_sse(request, events())
        try:
            results = await run_generate(req, batcher=batcher, tokenizer=tok, eos_ids=ctx.engine.eos_token_ids,
                                         score=ctx.score)
        except Exception as e:  # an engine failure of this request alone (see batcher): 500, clients retry
            log.exception("generate failed")
            return bad_request(f"generation failed: {e}", 500)
        objs = [format_result(r, req, rid, tokenizer=tok, weight_version=wv, started=started)
                for r, rid in zip(results, req.rids)]
        return web.json_response(objs[0] if req.single else objs)

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(_: web.Request) -> web.Response:
        if batcher.paused or batcher.in_flight:  # busy or paused for a weight sync: alive, do not queue behind
            return web.Response(status=200)
        try:
            await asyncio.wait_for(batcher.submit([[0]], SamplingParams(max_new_tokens=1, temperature=0.0)),
                                   HEALTH_TIMEOUT_S)
        except Exception as e:
            log.error("health_generate failed: %s", e)
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(_: web.Request) -> web.Response:
        arch = json.loads((Path(ctx.model_path) / "config.json").read_text())
        return web.json_response({
            "model_path": ctx.model_path, "served_model_name": ctx.served_model_name,
            "tokenizer_path": ctx.model_path, "is_generation": True, "preferred_sampling_params": None,
            "weight_version": ctx.info["weight_version"], "load_format": "auto", "reasoning_parser": None,
            "tool_call_parser": None, "disaggregation_mode": "null", "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": arch.get("model_type"),
            "architectures": arch.get("architectures")})

    async def server_info(_: web.Request) -> web.Response:
        from megaent import __version__

        return web.json_response({
            "model_path": ctx.model_path, "tokenizer_path": ctx.model_path,
            "served_model_name": ctx.served_model_name, "tp_size": ctx.tp, "dp_size": 1, "pp_size": 1,
            "context_length": ctx.context_len, "max_running_requests": batcher.max_rows,
            "batch_window_s": batcher.window_s, "startup_time": ctx.started, "version": __version__,
            "frontend": "megaent", "weight_version": ctx.info["weight_version"],
            "internal_states": [{"batches_run": batcher.batches_run, "batches_stopped": batcher.batches_stopped,
                                 "in_flight": batcher.in_flight, "paused": batcher.paused}],
            "in_flight": batcher.in_flight, "batches_run": batcher.batches_run})

    async def update_weights(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            path = body.get("model_path") if isinstance(body, dict) else None
            if not isinstance(path, str) or not path:
                raise BadRequest("model_path: required, the HF directory holding the new weights")
            abort_all = get_bool(body, "abort_all_requests", False, where="")
        except BadRequest as e:
            return web.json_response({"success": False, "message": str(e), "num_paused_requests": 0}, status=400)
        try:
            check_compatible(ctx.model_path, path)
            if abort_all:
                batcher.abort(abort_all=True)
            await batcher.run_exclusive(ctx.call, "load_checked", path)
        except Exception as e:  # WeightMismatch, or a load error; the served weights are unchanged
            if not isinstance(e, WeightMismatch):
                log.exception("weight update from %s failed; kept the served weights", path)
            return web.json_response({"success": False, "message": f"Failed to update weights: {e}. Rolled back "
                                      "to the served weights.", "num_paused_requests": 0}, status=400)
        ctx.model_path = path
        if body.get("weight_version") is not None:
            ctx.info["weight_version"] = str(body["weight_version"])
        return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": 0})

    async def update_weight_version(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            version = body.get("new_version") if isinstance(body, dict) else None
            if not isinstance(version, str) or not version:
                raise BadRequest("new_version: required, a string")
            abort_all = get_bool(body, "abort_all_requests", True, where="")
        except BadRequest as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)
        if abort_all:
            batcher.abort(abort_all=True)
        ctx.info["weight_version"] = version
        return web.json_response({"success": True, "message": f"Weight version updated to {version}",
                                  "new_version": version})

    async def pause_generation(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            mode = (body or {}).get("mode", "abort") if isinstance(body, dict) else None
            if mode not in ("abort", "retract", "in_place"):
                raise BadRequest(f"mode={mode!r}: must be 'abort', 'retract' or 'in_place'")
        except BadRequest as e:
            return bad_request(str(e))
        batcher.pause()
        if mode == "abort":
            batcher.abort(abort_all=True)
        await batcher.idle()  # retract / in_place: the running batch finishes, queued requests wait
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(request: web.Request) -> web.Response:
        batcher.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise BadRequest("request body: expected a JSON object with rid or abort_all")
            rid = body.get("rid")
            if rid is not None and not isinstance(rid, str):
                raise BadRequest(f"rid={rid!r:.80}: must be a string")
            abort_all = get_bool(body, "abort_all", False, where="")
        except BadRequest as e:
            return bad_request(str(e))
        batcher.abort(rid=rid or None, abort_all=abort_all)
        return web.Response(status=200)

    async def flush_cache(_: web.Request) -> web.Response:
        # No prefix cache to flush: every batch allocates its own KV cache.
        return web.Response(text="Cache flushed.\n", status=200)

    r = app.router
    r.add_post("/generate", generate)
    r.add_put("/generate", generate)
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    for name, fn in (("model_info", model_info), ("server_info", server_info)):
        r.add_get(f"/{name}", fn)
        r.add_get(f"/get_{name}", fn)  # SGLang's deprecated aliases
    r.add_post("/update_weights_from_disk", update_weights)
    r.add_post("/update_weight_version", update_weight_version)
    r.add_post("/pause_generation", pause_generation)
    r.add_post("/continue_generation", continue_generation)
    r.add_post("/abort_request", abort_request)
    r.add_get("/flush_cache", flush_cache)
    r.add_post("/flush_cache", flush_cache)
    add_dist_routes(app, ctx)


def _str_field(body: dict, key: str, default: Any = None) -> str:
    v = body.get(key, default)
    if not isinstance(v, str) or not v:
        raise BadRequest(f"{key}={v!r:.80}: required, a non-empty string")
    return v


def parse_dist_update(body: Any) -> dict:
    """SGLang's UpdateWeightsFromDistributedReqInput: names, dtypes, shapes (parallel lists), group_name,
    flush_cache, abort_all_requests, weight_version, load_format (None or "flattened_bucket")."""
    if not isinstance(body, dict):
        raise BadRequest("request body: expected a JSON object with names, dtypes and shapes")
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not names:
        raise BadRequest("names, dtypes, shapes: required, non-empty lists of one entry per tensor")
    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest(f"names, dtypes, shapes: {len(names)}, {len(dtypes)} and {len(shapes)} entries; "
                         "give one of each per tensor")
    for i, (n, d, s) in enumerate(zip(names, dtypes, shapes)):
        if not isinstance(n, str) or not n:
            raise BadRequest(f"names[{i}]={n!r:.80}: must be a tensor name")
        try:
            parse_dtype(d)
        except ValueError as e:
            raise BadRequest(f"dtypes[{i}]: {e}") from None
        if not isinstance(s, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in s):
            raise BadRequest(f"shapes[{i}]={s!r:.80}: must be a list of non-negative integers")
    fmt = body.get("load_format")
    if fmt not in (None, "flattened_bucket"):
        raise BadRequest(f"load_format={fmt!r:.80}: megaent serve takes null (one broadcast per tensor) or "
                         "'flattened_bucket'")
    version = body.get("weight_version")
    if version is not None and not isinstance(version, str):
        raise BadRequest(f"weight_version={version!r:.80}: must be a string")
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "flattened": fmt == "flattened_bucket",
            "group_name": _str_field(body, "group_name", "weight_update_group"), "weight_version": version,
            "flush_cache": get_bool(body, "flush_cache", True, where=""),
            "abort_all": get_bool(body, "abort_all_requests", False, where="")}


def add_dist_routes(app: web.Application, ctx: ServeContext) -> None:
    """SGLang's weight sync over a process group (megaent.rollout.dist_update has the protocol)."""
    batcher = ctx.batcher
    session_version: list[Optional[str]] = [None]  # the open session's weight_version, applied at its end

    def answer(ok: bool, message: str) -> web.Response:
        return web.json_response({"success": ok, "message": message}, status=200 if ok else 400)

    async def run_op(name: str, *args: Any) -> Any:
        """Run a DIST_OPS entry in the engine thread: directly at TP = 1, over the TP command bus otherwise."""
        if ctx.tp == 1:
            return await batcher.run_exclusive(DIST_OPS[name], ctx.engine, *args)
        from megaent.rollout.server import OPS

        if name not in OPS:  # the bus's followers run OPS entries only
            why = (f"megaent serve --tp {ctx.tp} cannot join a weight-update group (the TP bus has no {name} op); "
                   "serve with --tp 1 or sync through /update_weights_from_disk")
            return (False, why, False) if name == "dist_receive" else (False, why)
        return await batcher.run_exclusive(ctx.call, name, *args)

    async def init_group(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise BadRequest("request body: expected a JSON object (master_address, master_port, ...)")
            args = (_str_field(body, "master_address"),
                    get_int(body, "master_port", None, where="", lo=1, hi=65535),
                    get_int(body, "rank_offset", None, where="", lo=1, hi=2**20),
                    get_int(body, "world_size", None, where="", lo=2, hi=2**20),
                    _str_field(body, "group_name", "weight_update_group"), _str_field(body, "backend", "nccl"))
            if None in args:
                raise BadRequest("master_port, rank_offset, world_size: required integers")
            if args[2] + ctx.tp > args[3]:
                raise BadRequest(f"rank_offset={args[2]} + tp {ctx.tp} > world_size={args[3]}: this server's "
                                 "ranks would not fit in the group")
        except BadRequest as e:
            return answer(False, str(e))
        return answer(*await run_op("dist_init_group", *args))

    async def destroy_group(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            name = _str_field(body if isinstance(body, dict) else {}, "group_name", "weight_update_group")
        except BadRequest as e:
            return answer(False, str(e))
        return answer(*await run_op("dist_destroy_group", name))

    async def begin(_: web.Request) -> web.Response:
        session_version[0] = None
        return answer(*await run_op("dist_begin"))

    async def end(_: web.Request) -> web.Response:
        ok, message = await run_op("dist_end")
        version, session_version[0] = session_version[0], None
        if ok and version is not None:
            ctx.info["weight_version"] = version
            message += f" Weight version updated to {version}."
        return answer(ok, message)

    async def update(request: web.Request) -> web.Response:
        try:
            req = parse_dist_update(await read_json(request))
        except BadRequest as e:  # nothing received: the sender's broadcast waits until its group timeout
            return answer(False, str(e))
        if req["abort_all"]:
            batcher.abort(abort_all=True)
        ok, message, staged = await run_op("dist_receive", req["group_name"], req["names"], req["dtypes"],
                                           req["shapes"], req["flattened"])
        version = req["weight_version"]
        if ok and version is not None:
            if staged:  # inside a session the version goes live with the weights, at its end
                session_version[0] = version
            else:
                ctx.info["weight_version"] = version
                message += f" Weight version updated to {version}."
        # flush_cache: nothing to flush, every batch allocates its own KV cache (see flush_cache above).
        return answer(ok, message)

    async def get_weights(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            body = body if isinstance(body, dict) else {}
            name = _str_field(body, "name")
            size = get_int(body, "truncate_size", 100, where="", lo=1, hi=2**31)
            out = await batcher.run_exclusive(lambda: weights_by_name(ctx.engine.policy, name, size))
        except (BadRequest, KeyError) as e:
            return bad_request(str(e).strip("'\""))
        return web.json_response(out)

    r = app.router
    r.add_route("GET", "/get_weights_by_name", get_weights)
    r.add_post("/get_weights_by_name", get_weights)
    r.add_post("/init_weights_update_group", init_group)
    r.add_post("/destroy_weights_update_group", destroy_group)
    r.add_post("/begin_weight_update", begin)
    r.add_post("/end_weight_update", end)
    r.add_post("/update_weights_from_distributed", update)
