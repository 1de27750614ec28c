"""`megaent serve`: an aiohttp server speaking SGLang's HTTP protocol on the megaent policy.

    megaent serve --model HF_DIR [--host 127.0.0.1 --port 30000 --tp 1 --api-key KEY]
    torchrun --nproc-per-node 2 -m megaent.rollout.server --model HF_DIR --tp 2

Routes (SGLang 0.5.23 entrypoints/http_server.py is the reference):
POST|PUT /generate (native API, SSE with `stream`), GET /health,
/health_generate, /model_info, /server_info (and the deprecated /get_model_info,
/get_server_info), GET|POST /flush_cache, POST /update_weights_from_disk,
/update_weight_version, /pause_generation, /continue_generation,
/abort_request, and the OpenAI surface (megaent.rollout.openai_api): GET
/v1/models, POST /v1/completions, /v1/chat/completions. Request parsing and
bounds: megaent.rollout.protocol; engine calls: megaent.rollout.generation.

Behind them sits an `EmbeddedEngine` fed by a `DynamicBatcher`. With TP > 1
(torchrun, one process per TP rank) rank 0 serves HTTP and, before each
engine call, broadcasts the call to the other ranks over the TP group
(`broadcast_object_list`, one per batch); they run the same call in lockstep.

Security (issue 21, point 6): binds 127.0.0.1 unless told otherwise; any other
address needs an API key (`--api-key`, or $MEGAENT_API_KEY), checked as SGLang
checks its `--api-key`: `Authorization: Bearer KEY` on every route except
/health*, else 401 `{"error": "Unauthorized"}`.

Streaming: the engine decodes a batch to the end, so an SSE answer is sent once
its decode is done, one `data:` event per token (SGLang's event shape,
cumulative text), not token by token while decoding.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from aiohttp import web

from megaent.rollout.batcher import DecodeStopped, DynamicBatcher
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.generation import format_result, run_generate, stream_texts
from megaent.rollout.protocol import MAX_BODY_BYTES, BadRequest, error_body, get_bool, loads_body, parse_generate
from megaent.rollout.scoring import score_tokens
from megaent.rollout.types import SamplingParams
from megaent.rollout.weight_update import WeightMismatch, check_compatible, load_checked

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 20.0
API_KEY_ENV = "MEGAENT_API_KEY"
# Engine-side operations besides EmbeddedEngine's own methods; the TP bus runs them on every rank.
OPS: dict[str, Callable[..., Any]] = {"score_tokens": score_tokens, "load_checked": load_checked}


class TPCommandBus:
    """Rank 0 tells the other TP ranks which engine call to run next (no-op when TP = 1)."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.engine = engine
        st = engine.state
        self.group = st.tp_group if st.tp > 1 else None
        self.src = dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def run(self, name: str, *args: Any) -> Any:
        return OPS[name](self.engine, *args) if name in OPS else getattr(self.engine, name)(*args)

    def call(self, name: str, *args: Any) -> Any:
        """On rank 0: broadcast (name, args), then run it here too."""
        if self.group is not None:
            dist.broadcast_object_list([(name, args)], src=self.src, group=self.group)
        return self.run(name, *args)

    def follow(self) -> None:
        """On TP ranks > 0: run what rank 0 broadcasts until it says stop."""
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            name, args = box[0]
            if name == "stop":
                return
            try:
                self.run(name, *args)
            except Exception:  # rank 0 hits the same error and reports it; stay in lockstep
                log.exception("follower: %s failed", name)

    def stop(self) -> None:
        if self.group is not None:
            dist.broadcast_object_list([("stop", ())], src=self.src, group=self.group)


def install_step_hook(engine: EmbeddedEngine, should_stop: Callable[[], bool]) -> bool:
    """Let a running decode stop between two steps when `should_stop()` (every request gone).

    Wraps the engine's per-step forward (`_last_logits`); returns False, and
    leaves the engine alone, when it has none (a decode then runs to its end).
    Only for TP = 1: the other ranks of a TP decode would wait in a collective.
    """
    step = getattr(engine, "_last_logits", None)
    if step is None or engine.state.tp > 1:
        return False

    def checked(*args: Any, **kw: Any) -> Any:
        if should_stop():
            raise DecodeStopped()
        return step(*args, **kw)
    engine._last_logits = checked
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_middleware(api_key: str) -> Callable:
    """SGLang's api-key rule (srt/utils/auth.py): Bearer KEY everywhere except OPTIONS and /health*."""
    @web.middleware
    async def check(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path.startswith(("/health", "/ready", "/metrics")):
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)
    return check


@dataclass
class ServeContext:
    """What the route handlers share."""

    engine: EmbeddedEngine
    tokenizer: Any
    batcher: DynamicBatcher
    call: Callable[..., Any]
    model_path: str
    served_model_name: str
    context_len: int
    tp: int = 1
    info: dict = field(default_factory=lambda: {"weight_version": "default"})
    started: float = field(default_factory=time.time)

    async def score(self, ids: list[int], temperature: float, start: int, top_n: int) -> Any:
        return await self.batcher.run_exclusive(self.call, "score_tokens", ids, temperature, start, top_n)


async def read_json(request: web.Request) -> Any:
    """The body as JSON (bounded by client_max_size and protocol.check_json); {} when empty."""
    raw = await request.read()
    return loads_body(raw) if raw.strip() else {}


def bad_request(message: str, status: int = 400) -> web.Response:
    return web.json_response(error_body(message, status), status=status)


async def send_sse(request: web.Request, events: AsyncIterator[dict]) -> web.StreamResponse:
    """`data: {json}\\n\\n` per event, then `data: [DONE]\\n\\n` (SGLang's and OpenAI's framing)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    async for ev in events:
        await resp.write(b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _context_len(model: str) -> int:
    cfg = json.loads((Path(model) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)


def build_app(engine: EmbeddedEngine, *, tokenizer: Any, model_path: str, call: Optional[Callable] = None,
              window_s: float = 0.005, max_rows: int = 256, api_key: Optional[str] = None,
              served_model_name: Optional[str] = None, context_len: Optional[int] = None) -> web.Application:
    """The aiohttp application around `engine`; `call(name, *args)` runs an engine op (TP bus or direct)."""
    from megaent.rollout.openai_api import add_openai_routes

    if call is None:
        call = TPCommandBus(engine).call
    batcher = DynamicBatcher(lambda jobs: call("generate_many", jobs), window_s=window_s, max_rows=max_rows)
    install_step_hook(engine, batcher.should_stop)
    ctx = ServeContext(engine=engine, tokenizer=tokenizer, batcher=batcher, call=call, model_path=model_path,
                       served_model_name=served_model_name or model_path,
                       context_len=context_len or _context_len(model_path), tp=engine.state.tp)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[auth_middleware(api_key)] if api_key else [])
    app["ctx"] = ctx

    async def on_startup(_: web.Application) -> None:
        await batcher.start()

    async def on_cleanup(_: web.Application) -> None:
        await batcher.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    add_native_routes(app, ctx)
    add_openai_routes(app, ctx)
    return app


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


def serve(model: str, *, host: str = "127.0.0.1", port: int = 30000, tp: int = 1, dtype: str = "float32",
          seed: int = 0, window_ms: float = 5.0, max_rows: int = 256, api_key: Optional[str] = None,
          served_model_name: Optional[str] = None, context_length: Optional[int] = None) -> None:
    """Load the model over TP ranks and serve until interrupted (rank 0 serves HTTP)."""
    from transformers import AutoTokenizer

    from megaent.parallel import destroy_parallel, init_parallel

    state = init_parallel(tp, 1)
    try:
        engine = EmbeddedEngine.from_hf(model, state, dtype=getattr(torch, dtype), seed=seed, max_batch_rows=max_rows)
        bus = TPCommandBus(engine)
        if state.tp_rank != 0:
            bus.follow()
            return
        tokenizer = AutoTokenizer.from_pretrained(model)
        app = build_app(engine, tokenizer=tokenizer, model_path=model, call=bus.call, window_s=window_ms / 1000,
                        max_rows=max_rows, api_key=api_key, served_model_name=served_model_name,
                        context_len=context_length)
        log.info("megaent serve: %s on http://%s:%d (tp=%d%s)", model, host, port, tp,
                 ", API key required" if api_key else "")
        try:
            # handler_cancellation: a client that hangs up cancels its handler, so its decode is aborted.
            web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True,
                        handler_cancellation=True)
        finally:
            bus.stop()
    finally:
        destroy_parallel()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megaent serve", description="SGLang-compatible rollout server on the megaent policy: SGLang's native "
        "API (POST /generate, /update_weights_from_disk, /pause_generation, ...) and OpenAI's (/v1/completions, "
        "/v1/chat/completions, /v1/models). Binds loopback by default; another --host needs an API key.")
    p.add_argument("--model", required=True, help="HF checkpoint directory (Qwen2 / Llama family) to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1, loopback only); any other address requires --api-key")
    p.add_argument("--port", type=int, default=30000, help="TCP port (default 30000, SGLang's)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health* (SGLang's --api-key); "
                   f"default ${API_KEY_ENV}, which keeps the key off the command line")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch this many ranks with torchrun)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random streams of requests without sampling_seed")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the batcher waits for more requests before a decode (default 5 ms)")
    p.add_argument("--max-batch-rows", type=int, default=256,
                   help="most sample rows (prompts x n) decoded together (default 256)")
    p.add_argument("--served-model-name", default=None,
                   help="model name in /v1/models and OpenAI answers (default: the --model path, as SGLang)")
    p.add_argument("--context-length", type=int, default=None,
                   help="prompt + max_new_tokens limit (default: max_position_embeddings of config.json)")
    p.add_argument("--log-level", default="INFO", help="logging level: DEBUG shows ignored request fields")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(list(argv) if argv is not None else None)
    if not Path(a.model).is_dir():
        p.error(f"--model {a.model}: no such directory (give a HF checkpoint directory)")
    api_key = a.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(a.host) and not api_key:
        p.error(f"--host {a.host}: a non-loopback address needs an API key; pass --api-key KEY or set "
                f"${API_KEY_ENV} (clients send `Authorization: Bearer KEY`), or bind 127.0.0.1")
    if a.context_length is not None and a.context_length < 2:
        p.error(f"--context-length {a.context_length}: must be >= 2")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(a.model, host=a.host, port=a.port, tp=a.tp, dtype=a.dtype, seed=a.seed, window_ms=a.batch_window_ms,
          max_rows=a.max_batch_rows, api_key=api_key, served_model_name=a.served_model_name,
          context_length=a.context_length)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
