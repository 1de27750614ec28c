"""What the route modules of `megaent serve` share: the `ServeContext`, JSON bodies in, errors and SSE out."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from megaent.rollout.batcher import DynamicBatcher
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.protocol import error_body, loads_body


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
    try:
        async for ev in events:
            await resp.write(b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n")
    finally:  # also when the client hung up mid-stream: the generator's cleanup (aborting the decode) runs now
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
