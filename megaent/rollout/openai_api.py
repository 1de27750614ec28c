"""OpenAI-compatible routes of `megaent serve`: GET /v1/models, POST /v1/completions, /v1/chat/completions.

Field names, defaults and answer shapes follow SGLang 0.5.23's OpenAI layer
(srt/entrypoints/openai/protocol.py, serving_completions.py, serving_chat.py),
itself OpenAI's API: completions default to max_tokens=16, chat to the rest of
the context; `stop`, `n`, `seed`, `logprobs` / `top_logprobs`, `stream` (SSE
chunks, then `data: [DONE]`, a usage chunk with
`stream_options.include_usage`) and SGLang's extra sampling keys (top_k,
min_tokens, stop_token_ids, ignore_eos, no_stop_trim, skip_special_tokens,
repetition_penalty, ...) are honoured; the chat prompt is the tokenizer's chat
template with `add_generation_prompt`. Errors are SGLang's `ErrorResponse`.
Tool calls, multimodal content and `echo` with log-probs are not supported
(the first two: 400 naming the field).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Optional

from aiohttp import web

from megaent.rollout.generation import Chunk, Result, run_generate, stream_generate, text_of
from megaent.rollout.protocol import (INT64, MAX_ROWS, BadRequest, GenerateRequest, Job, check_context, get_bool,
                                      get_int, openai_error_body, parse_sampling_params)
from megaent.rollout.serve_context import ServeContext, read_json, send_sse

# OpenAI / SGLang request key -> SGLang sampling_params key
_SAMPLING_ALIASES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "n": "n", "seed": "sampling_seed", "stop": "stop", "stop_token_ids": "stop_token_ids",
                     "stop_regex": "stop_regex", "min_tokens": "min_new_tokens", "ignore_eos": "ignore_eos",
                     "no_stop_trim": "no_stop_trim", "skip_special_tokens": "skip_special_tokens",
                     "spaces_between_special_tokens": "spaces_between_special_tokens",
                     "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
                     "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias",
                     "regex": "regex", "json_schema": "json_schema", "ebnf": "ebnf"}


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response(openai_error_body(message, status), status=status)


def _sampling(body: dict, max_tokens: Optional[int], *, vocab_size: int) -> tuple[Any, Any]:
    sp = {dst: body[src] for src, dst in _SAMPLING_ALIASES.items() if body.get(src) is not None}
    if sp.get("logit_bias") == {}:
        del sp["logit_bias"]
    sp["max_new_tokens"] = max_tokens
    return parse_sampling_params(sp, where="", vocab_size=vocab_size)


def _prompt_ids(prompt: Any, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("prompt: must be a string, a list of strings or token ids")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        ids = tokenizer.encode(p) if isinstance(p, str) else p
        if not isinstance(ids, list) or not ids or any(
                isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
            raise BadRequest(f"prompt[{i}]: must be a non-empty string or list of token ids in [0, {vocab_size})")
        out.append(ids)
    return out


def _finish(r: Result) -> tuple[Optional[str], Any]:
    kind = r.finish.get("type")
    return ("stop" if kind == "stop" else "length" if kind == "length" else "abort"), r.finish.get("matched")


def _usage(results: list[Result], n: int) -> dict:
    prompt = sum(len(r.prompt_ids) for r in results[::n])
    completion = sum(len(r.output_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": None, "reasoning_tokens": 0}


def add_openai_routes(app: web.Application, ctx: ServeContext) -> None:
    tok = ctx.tokenizer

    def model_card() -> dict:
        return {"id": ctx.served_model_name, "object": "model", "created": int(ctx.started), "owned_by": "sglang",
                "root": ctx.served_model_name, "parent": None, "max_model_len": ctx.context_len}

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_card()]})

    async def parse(request: web.Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest(f"request body: expected a JSON object, got {type(body).__name__}")
        for key in ("tools", "functions"):
            if body.get(key):
                raise BadRequest(f"{key}: tool calling is not supported by megaent serve; omit it")
        return body

    def request_of(prompts: list[list[int]], body: dict, *, max_tokens: Optional[int], logprobs: bool,
                   top_n: int) -> GenerateRequest:
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = max(ctx.context_len - longest, 0)
        params, opts = _sampling(body, max_tokens, vocab_size=ctx.engine.vocab_size)
        if len(prompts) * params.n > MAX_ROWS:
            raise BadRequest(f"n={params.n}: {len(prompts)} prompts x n is over {MAX_ROWS} samples")
        for p in prompts:
            check_context(len(p), opts.max_new_tokens, context_len=ctx.context_len, field_name="max_tokens")
        rid = body.get("rid") if isinstance(body.get("rid"), str) else uuid.uuid4().hex
        return GenerateRequest(jobs=[Job(prompts, params, opts, 0)], n_prompts=len(prompts), single=False,
                               rids=[f"{rid}_{k}" for k in range(len(prompts) * params.n)], return_logprob=logprobs,
                               top_logprobs_num=top_n)

    async def run(req: GenerateRequest) -> list[Result]:
        return await run_generate(req, batcher=ctx.batcher, tokenizer=tok, eos_ids=ctx.engine.eos_token_ids,
                                  score=ctx.score)

    async def deltas(req: GenerateRequest) -> AsyncIterator[tuple[Chunk, str]]:
        """(chunk, the text it adds) while the answers decode; every final chunk, with its remaining text."""
        sent: dict[int, str] = {}
        chunks = stream_generate(req, batcher=ctx.batcher, tokenizer=tok, eos_ids=ctx.engine.eos_token_ids,
                                 score=ctx.score)
        try:
            async for c in chunks:
                before = sent.get(c.index, "")
                add = c.text[len(before):] if c.text.startswith(before) else ""
                if add or c.done:
                    sent[c.index] = before + add
                    yield c, add
        finally:
            await chunks.aclose()

    def stream_options(body: dict) -> bool:
        so = body.get("stream_options")
        return isinstance(so, dict) and bool(so.get("include_usage"))

    # ---------------------------------------------------------------- /v1/completions
    def completion_logprobs(r: Result, top_n: int) -> dict:
        tokens = [tok.decode([t]) for t in r.output_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top = ([{tok.decode([i]): lp for lp, i in x} for x in (r.output_top or [])] if top_n > 0
               else [None] * len(tokens))
        return {"text_offset": offsets, "token_logprobs": list(r.logprobs), "tokens": tokens, "top_logprobs": top}

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await parse(request)
            prompts = _prompt_ids(body.get("prompt"), tok, ctx.engine.vocab_size)
            lp = get_int(body, "logprobs", None, where="", lo=0, hi=20)
            stream = get_bool(body, "stream", False, where="")
            echo = get_bool(body, "echo", False, where="")
            max_tokens = get_int(body, "max_tokens", 16, where="", lo=0, hi=INT64 - 1)
            req = request_of(prompts, body, max_tokens=max_tokens, logprobs=lp is not None, top_n=lp or 0)
        except BadRequest as e:
            return _error(str(e))
        n = req.jobs[0].params.n
        cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), ctx.served_model_name

        def choice(k: int, r: Result, text: str, done: bool = True) -> dict:
            reason, matched = _finish(r) if done else (None, None)
            return {"index": k, "text": text, "logprobs": completion_logprobs(r, lp or 0) if lp is not None and done
                    else None, "finish_reason": reason, "matched_stop": matched}

        def prefix(r: Result) -> str:
            return tok.decode(r.prompt_ids) if echo else ""

        if not stream:
            results = await run(req)
            return web.json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                                      "choices": [choice(k, r, prefix(r) + text_of(r, tok))
                                                  for k, r in enumerate(results)],
                                      "usage": _usage(results, n)})

        def event(choices: list) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}

        async def events() -> AsyncIterator[dict]:
            finals: dict[int, Result] = {}
            if echo:
                for k in range(len(req.rids)):
                    yield event([choice(k, Result(req.jobs[0].prompts[k // n], [], [], {}, req.jobs[0].opts),
                                        tok.decode(req.jobs[0].prompts[k // n]), done=False)])
            async for c, add in deltas(req):
                if add:
                    yield event([choice(c.index, c.result, add, done=False)])
                if c.done:
                    finals[c.index] = c.result
                    yield event([choice(c.index, c.result, "")])
            if stream_options(body):
                yield {**event([]), "usage": _usage([finals[k] for k in sorted(finals)], n)}
        return await send_sse(request, events())

    # ---------------------------------------------------------------- /v1/chat/completions
    def chat_prompt(body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: must be a non-empty list of {role, content}")
        norm = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}]: must be an object with a string role")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: text only
                if any(not isinstance(c, dict) or c.get("type") != "text" for c in content):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported by megaent serve")
                content = "".join(str(c.get("text", "")) for c in content)
            if content is not None and not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content: must be a string or a list of text parts")
            norm.append({"role": m["role"], "content": content or ""})
        if getattr(tok, "chat_template", None) is None:
            raise BadRequest("messages: the served tokenizer has no chat template; use /v1/completions")
        text = tok.apply_chat_template(norm, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            raise BadRequest("messages: the chat template renders to zero tokens")
        return ids

    def chat_logprobs(r: Result, top_n: int) -> dict:
        def entry(lp: float, t: int) -> dict:
            s = tok.decode([t])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        tops = r.output_top or [[]] * len(r.output_ids)
        return {"content": [{**entry(lp, t), "top_logprobs": [entry(a, b) for a, b in top][:top_n]}
                            for lp, t, top in zip(r.logprobs, r.output_ids, tops)]}

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await parse(request)
            prompt = chat_prompt(body)
            want_lp = get_bool(body, "logprobs", False, where="")
            top_n = get_int(body, "top_logprobs", 0, where="", lo=0, hi=20)
            stream = get_bool(body, "stream", False, where="")
            mt = get_int(body, "max_completion_tokens", None, where="", lo=0, hi=INT64 - 1)
            mt = get_int(body, "max_tokens", mt, where="", lo=0, hi=INT64 - 1)
            req = request_of([prompt], body, max_tokens=mt, logprobs=want_lp, top_n=top_n if want_lp else 0)
        except BadRequest as e:
            return _error(str(e))
        n = req.jobs[0].params.n
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ctx.served_model_name
        if not stream:
            results = await run(req)
            choices = []
            for k, r in enumerate(results):
                reason, matched = _finish(r)
                choices.append({"index": k, "message": {"role": "assistant", "content": text_of(r, tok),
                                                        "reasoning_content": None, "tool_calls": None},
                                "logprobs": chat_logprobs(r, top_n) if want_lp else None,
                                "finish_reason": reason, "matched_stop": matched})
            return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                      "choices": choices, "usage": _usage(results, n)})

        def chunk(k: int, delta: dict, reason: Optional[str] = None, matched: Any = None, lp: Any = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": reason,
                                 "matched_stop": matched}]}

        async def events() -> AsyncIterator[dict]:
            finals: dict[int, Result] = {}
            for k in range(len(req.rids)):
                yield chunk(k, {"role": "assistant", "content": ""})
            async for c, add in deltas(req):
                if add:
                    yield chunk(c.index, {"content": add})
                if c.done:
                    finals[c.index] = c.result
                    reason, matched = _finish(c.result)
                    yield chunk(c.index, {}, reason, matched, chat_logprobs(c.result, top_n) if want_lp else None)
            if stream_options(body):
                yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": _usage([finals[k] for k in sorted(finals)], n)}
        return await send_sse(request, events())

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
