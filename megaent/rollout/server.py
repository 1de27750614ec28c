"""`megaent serve`: an aiohttp server speaking SGLang's HTTP protocol on the megaent policy.

    megaent serve --model HF_DIR [--host 127.0.0.1 --port 30000 --tp 1 --api-key KEY]
    torchrun --nproc-per-node 2 -m megaent.rollout.server --model HF_DIR --tp 2

Routes (SGLang 0.5.23 entrypoints/http_server.py is the reference):
POST|PUT /generate (native API, SSE with `stream`), GET /health,
/health_generate, /model_info, /server_info (and the deprecated /get_model_info,
/get_server_info), GET|POST /flush_cache, POST /update_weights_from_disk,
/update_weight_version, /pause_generation, /continue_generation,
/abort_request, /release_memory_occupation, /resume_memory_occupation (colocated
rollouts: megaent.rollout.memory_api), and the OpenAI surface (megaent.rollout.openai_api): GET
/v1/models, POST /v1/completions, /v1/chat/completions. Request parsing and
bounds: megaent.rollout.protocol; engine calls: megaent.rollout.generation; native
routes: megaent.rollout.native_api.

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
import json
import logging
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from aiohttp import web

from megaent.cli import SERVE_API_KEY_ENV as API_KEY_ENV, is_loopback  # noqa: F401 (re-exported)
from megaent.rollout.batcher import DecodeStopped, DynamicBatcher
from megaent.rollout.dist_update import DIST_OPS
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.memory_api import MEMORY_OPS, add_memory_routes
from megaent.rollout.native_api import add_native_routes
from megaent.rollout.openai_api import add_openai_routes
from megaent.rollout.protocol import MAX_BODY_BYTES
from megaent.rollout.scoring import score_tokens
from megaent.rollout.serve_context import ServeContext
from megaent.rollout.weight_update import load_checked

log = logging.getLogger(__name__)
# Engine-side operations besides EmbeddedEngine's own methods; the TP bus runs them on every rank.
# The followers of a TP > 1 server run only these, so every route's engine op is listed here.
OPS: dict[str, Callable[..., Any]] = {"score_tokens": score_tokens, "load_checked": load_checked, **DIST_OPS,
                                      **MEMORY_OPS}


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


def _context_len(model: str) -> int:
    cfg = json.loads((Path(model) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)


def build_app(engine: EmbeddedEngine, *, tokenizer: Any, model_path: str, call: Optional[Callable] = None,
              window_s: float = 0.005, max_rows: int = 256, api_key: Optional[str] = None,
              served_model_name: Optional[str] = None, context_len: Optional[int] = None) -> web.Application:
    """The aiohttp application around `engine`; `call(name, *args)` runs an engine op (TP bus or direct)."""
    if call is None:
        call = TPCommandBus(engine).call
    batcher = DynamicBatcher(lambda jobs: call("generate_many", jobs), window_s=window_s, max_rows=max_rows)
    install_step_hook(engine, batcher.should_stop)
    engine.on_step = batcher.engine_step  # streamed answers get their tokens as they are decoded
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
    add_memory_routes(app, ctx)
    return app


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
    """`megaent serve`'s parser (its options live in megaent.cli, which imports no torch, so --help is fast)."""
    from megaent.cli import SERVE_DESCRIPTION, add_serve_arguments

    p = argparse.ArgumentParser(prog="megaent serve", description=SERVE_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m megaent.rollout.server ARGS` (what torchrun runs for TP > 1) = `megaent serve ARGS`."""
    from megaent.cli import run_serve

    p = build_parser()
    return run_serve(p, p.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    raise SystemExit(main())
