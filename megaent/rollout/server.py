"""`megaent serve`: an aiohttp server speaking the SGLang HTTP subset megaent uses.

    python -m megaent.rollout.server --model HF_DIR [--host 127.0.0.1 --port 30000 --tp 1]
    torchrun --nproc-per-node 2 -m megaent.rollout.server --model HF_DIR --tp 2

Endpoints (wire format and the SGLang source it was checked against: see
`megaent.rollout.protocol`): POST /generate, GET /health, GET
/health_generate, GET /get_model_info, GET /get_server_info, POST
/update_weights_from_disk, GET|POST /flush_cache.

Behind them sits an `EmbeddedEngine` fed by a `DynamicBatcher`. With TP > 1
(torchrun, one process per TP rank) rank 0 serves HTTP and, before each
engine call, broadcasts the call to the other ranks over the TP group
(`broadcast_object_list`, one per batch); they run the same call in lockstep
and rank 0 answers. Binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from aiohttp import web

from megaent.rollout.batcher import DynamicBatcher
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.protocol import BadRequest, error_body, format_response, parse_generate

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 20.0


class TPCommandBus:
    """Rank 0 tells the other TP ranks which engine call to run next (no-op when TP = 1)."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.engine = engine
        st = engine.state
        self.group = st.tp_group if st.tp > 1 else None
        self.src = dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def call(self, name: str, *args: Any) -> Any:
        """On rank 0: broadcast (name, args), then run it here too."""
        if self.group is not None:
            dist.broadcast_object_list([(name, args)], src=self.src, group=self.group)
        return getattr(self.engine, name)(*args)

    def follow(self) -> None:
        """On TP ranks > 0: run what rank 0 broadcasts until it says stop."""
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            name, args = box[0]
            if name == "stop":
                return
            try:
                getattr(self.engine, name)(*args)
            except Exception:  # rank 0 hits the same error and reports it; stay in lockstep
                log.exception("follower: %s failed", name)

    def stop(self) -> None:
        if self.group is not None:
            dist.broadcast_object_list([("stop", ())], src=self.src, group=self.group)


def _json_error(message: str, status: int = 400) -> web.Response:
    return web.json_response(error_body(message, status), status=status)


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON ({e}); send a JSON object") from None


def build_app(engine: EmbeddedEngine, *, tokenizer: Any, model_path: str, call: Optional[Callable] = None,
              window_s: float = 0.005, max_rows: int = 256) -> web.Application:
    """The aiohttp application around `engine`; `call(name, *args)` runs an engine method (TP bus or direct)."""
    call = call or (lambda name, *args: getattr(engine, name)(*args))
    batcher = DynamicBatcher(lambda jobs: call("generate_many", jobs), window_s=window_s, max_rows=max_rows)
    info = {"model_path": model_path, "weight_version": "default"}
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["batcher"] = batcher

    async def on_startup(_: web.Application) -> None:
        await batcher.start()

    async def on_cleanup(_: web.Application) -> None:
        await batcher.stop()

    async def generate(request: web.Request) -> web.Response:
        try:
            req = parse_generate(await _read_json(request), tokenizer=tokenizer, vocab_size=engine.vocab_size)
        except BadRequest as e:
            return _json_error(str(e))
        try:
            samples = await batcher.submit(req.prompts, req.params)
        except Exception as e:  # engine failure: 500 so clients retry elsewhere
            return _json_error(f"generation failed: {e}", 500)
        return web.json_response(format_response(samples, req, tokenizer=tokenizer,
                                                 weight_version=info["weight_version"]))

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(_: web.Request) -> web.Response:
        from megaent.rollout.types import SamplingParams

        try:
            await asyncio.wait_for(batcher.submit([[0]], SamplingParams(max_new_tokens=1, temperature=0.0)),
                                   HEALTH_TIMEOUT_S)
        except Exception as e:
            log.error("health_generate failed: %s", e)
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(_: web.Request) -> web.Response:
        return web.json_response({"model_path": info["model_path"], "tokenizer_path": model_path,
                                  "is_generation": True, "preferred_sampling_params": None,
                                  "weight_version": info["weight_version"]})

    async def server_info(_: web.Request) -> web.Response:
        st = engine.state
        return web.json_response({"model_path": info["model_path"], "tp_size": st.tp, "engine": "megaent",
                                  "max_batch_rows": max_rows, "batch_window_s": window_s,
                                  "batches_run": batcher.batches_run, "in_flight": batcher.in_flight,
                                  "weight_version": info["weight_version"]})

    async def update_weights(request: web.Request) -> web.Response:
        try:
            body = await _read_json(request)
            path = body.get("model_path") if isinstance(body, dict) else None
            if not isinstance(path, str) or not path:
                raise BadRequest("model_path: required, the HF directory holding the new weights")
        except BadRequest as e:
            return _json_error(str(e))
        if not Path(path).is_dir():
            return web.json_response({"success": False, "message": f"model_path={path!r}: no such directory",
                                      "num_paused_requests": 0}, status=400)
        try:
            await batcher.run_exclusive(call, "load_weights", path)
        except Exception as e:
            return web.json_response({"success": False, "message": f"failed to load {path}: {e}",
                                      "num_paused_requests": 0}, status=400)
        info["model_path"] = path
        if body.get("weight_version") is not None:
            info["weight_version"] = str(body["weight_version"])
        return web.json_response({"success": True, "message": f"Succeeded to update model weights from {path}.",
                                  "num_paused_requests": 0})

    async def flush_cache(_: web.Request) -> web.Response:
        # No prefix cache to flush: every batch allocates its own KV cache.
        return web.Response(text="Cache flushed.\n", status=200)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/generate", generate)
    app.router.add_put("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_post("/update_weights_from_disk", update_weights)
    app.router.add_route("*", "/flush_cache", flush_cache)
    return app


def serve(model: str, *, host: str = "127.0.0.1", port: int = 30000, tp: int = 1, dtype: str = "float32",
          seed: int = 0, window_ms: float = 5.0, max_rows: int = 256) -> None:
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
                        max_rows=max_rows)
        log.info("megaent serve: %s on http://%s:%d (tp=%d)", model, host, port, tp)
        try:
            web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
        finally:
            bus.stop()
    finally:
        destroy_parallel()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megaent serve", description="SGLang-compatible rollout server on the "
                                "megaent policy (POST /generate, /update_weights_from_disk, GET /health_generate)")
    p.add_argument("--model", required=True, help="HF checkpoint directory (Qwen2 / Llama family)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch this many ranks with torchrun)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="seed of requests that carry no sampling_seed")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to wait for requests to batch")
    p.add_argument("--max-batch-rows", type=int, default=256, help="most sample rows decoded together")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(list(argv) if argv is not None else None)
    if not Path(a.model).is_dir():
        p.error(f"--model {a.model}: no such directory (give a HF checkpoint directory)")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(a.model, host=a.host, port=a.port, tp=a.tp, dtype=a.dtype, seed=a.seed, window_ms=a.batch_window_ms,
          max_rows=a.max_batch_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
