"""SGLang's native routes of `megaent serve` (SGLang 0.5.23 entrypoints/http_server.py is the reference).

POST|PUT /generate (SSE with `stream`), GET /health, /health_generate, /model_info, /server_info (and the
deprecated /get_model_info, /get_server_info), GET|POST /flush_cache, POST /update_weights_from_disk,
/update_weight_version, /pause_generation, /continue_generation, /abort_request. Answer shapes follow
SGLang's; `/update_weights_from_disk` checks and rolls back (megaent.rollout.weight_update).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from megaent.rollout.generation import format_result, run_generate, stream_texts
from megaent.rollout.protocol import BadRequest, get_bool, parse_generate
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
        try:
            results = await run_generate(req, batcher=batcher, tokenizer=tok, eos_ids=ctx.engine.eos_token_ids,
                                         score=ctx.score)
        except Exception as e:  # an engine failure of this request alone (see batcher): 500, clients retry
            log.exception("generate failed")
            return bad_request(f"generation failed: {e}", 500)
        wv = ctx.info["weight_version"]
        if not req.stream:
            objs = [format_result(r, req, rid, tokenizer=tok, weight_version=wv, started=started)
                    for r, rid in zip(results, req.rids)]
            return web.json_response(objs[0] if req.single else objs)

        async def events() -> AsyncIterator[dict]:
            for k, (r, rid) in enumerate(zip(results, req.rids)):
                texts = stream_texts(r, tok) or [""]
                for upto, text in enumerate(texts, start=1):
                    ev = format_result(r, req, rid, tokenizer=tok, weight_version=wv, started=started, upto=upto,
                                       text=text)
                    if not req.single:
                        ev["index"] = k
                    yield ev
        return await send_sse(request, events())

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
