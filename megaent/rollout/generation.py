"""One parsed `/generate` request through the engine, and its SGLang-shaped answer objects.

`run_generate(req, ...)` submits the request's jobs to the dynamic batcher and
turns each engine `Sample` into a `Result`:

- stop strings / stop regexes are matched the way SGLang's scheduler does
  (managers/schedule_batch.py `_check_str_based_finish`): after each token, the
  decoded tail is searched and the output is cut at the first token whose text
  completes a match; a string match wins over a stop token at the same step.
  `text` drops the matched string unless `no_stop_trim` (detokenizer_manager.py
  `trim_matched_stop`: `text[:text.find(matched)]`).
- `min_new_tokens`: the engine decodes with `ignore_eos` and no stop ids and
  the output is cut at the first stop token at index >= min_new_tokens.
  Unlike SGLang, which masks EOS before then, an early EOS stays in the output.
- `max_new_tokens=0` never reaches the engine (empty output, length 0).
- input-token and top log-probs come from a teacher-forced forward
  (`megaent.rollout.scoring`), run on the engine thread between batches.

`stream_generate(req, ...)` is the streaming form: it yields a chunk per
answer token while the engine decodes it (the batcher's `on_tokens` hook), then
each answer's final object. Partial text is decoded incrementally and held back
where it could be the start of a stop string or ends inside a UTF-8 character,
so a shown text is never taken back; once an answer meets a stop (string,
regex, token, or min_new_tokens' first stop) its partial chunks end and the
final object carries the cut answer. A request for input-token or top
log-probs (computed by a forward after the decode) streams its chunks after
the decode, from the finished answer.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from megaent.rollout.batcher import DynamicBatcher, RequestAborted
from megaent.rollout.protocol import GenerateRequest, Job, Options
from megaent.rollout.types import Sample, SamplingParams

Score = Callable[[list[int], float, int, int], Awaitable[tuple[list[float], list[list[tuple[float, int]]]]]]
OnToken = Callable[[int, int, int, float], None]  # (answer index, token position, token, log-prob)


@dataclass
class Result:
    """One answer object before formatting."""

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    finish: dict
    opts: Options
    temperature: float = 1.0
    input_lps: Optional[list] = None  # [(logprob | None, id)] from logprob_start_len
    input_top: Optional[list] = None
    output_top: Optional[list] = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ engine params and post-processing
def engine_params(params: SamplingParams, opts: Options) -> SamplingParams:
    """What the engine runs: with min_new_tokens, no stops at all (they are applied afterwards)."""
    if opts.min_new_tokens > 0:
        return replace(params, ignore_eos=True, stop_token_ids=())
    return params


def _stop_token_cut(s: Sample, params: SamplingParams, opts: Options, eos_ids: list[int]
                    ) -> tuple[list[int], list[float], dict]:
    ids, lps = list(s.output_ids), list(s.logprobs)
    if opts.min_new_tokens > 0:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        for k in range(opts.min_new_tokens, len(ids)):
            if ids[k] in stops:
                return ids[:k + 1], lps[:k + 1], {"type": "stop", "matched": ids[k]}
        return ids, lps, {"type": "length", "length": len(ids)}
    if s.finish_reason == "stop":
        return ids, lps, {"type": "stop", "matched": s.matched_stop}
    return ids, lps, {"type": "length", "length": len(ids)}


def _tail_tokens(tokenizer: Any, stops: tuple[str, ...]) -> int:
    """How many trailing tokens can hold a stop string (SGLang: stop_str_max_len + 1), plus a margin."""
    return max(len(tokenizer.encode(s, add_special_tokens=False)) for s in stops) + 2


def _string_cut(ids: list[int], opts: Options, tokenizer: Any) -> Optional[tuple[int, str]]:
    """(number of tokens kept, matched string or pattern) of the first stop-string / regex match, or None."""
    if not (opts.stop_strs or opts.stop_regex):
        return None
    w = _tail_tokens(tokenizer, opts.stop_strs) if opts.stop_strs else 0
    for k in range(1, len(ids) + 1):
        if opts.stop_strs:
            tail = tokenizer.decode(ids[max(0, k - w):k])
            for s in opts.stop_strs:
                if s in tail:
                    return k, s
        if opts.stop_regex:
            text = tokenizer.decode(ids[:k])
            for pattern in opts.stop_regex:
                if re.search(pattern, text):
                    return k, pattern
    return None


def postprocess(s: Sample, params: SamplingParams, opts: Options, *, tokenizer: Any, eos_ids: list[int]) -> Result:
    ids, lps, finish = _stop_token_cut(s, params, opts, eos_ids)
    cut = _string_cut(ids, opts, tokenizer)
    if cut is not None:
        k, matched = cut
        ids, lps, finish = ids[:k], lps[:k], {"type": "stop", "matched": matched}
    return Result(prompt_ids=list(s.prompt_ids), output_ids=ids, logprobs=lps, finish=finish, opts=opts,
                  temperature=params.temperature)


def empty_result(prompt: list[int], opts: Options, finish: dict, temperature: float = 1.0) -> Result:
    return Result(prompt_ids=list(prompt), output_ids=[], logprobs=[], finish=finish, opts=opts,
                  temperature=temperature)


# ------------------------------------------------------------------ running a request
async def _run_job(job: Job, rids: list[str], *, batcher: DynamicBatcher, tokenizer: Any, eos_ids: list[int],
                   on_token: Optional[OnToken] = None) -> list[Result]:
    n = job.params.n
    if job.opts.max_new_tokens == 0:
        return [empty_result(p, job.opts, {"type": "length", "length": 0}, job.params.temperature)
                for p in job.prompts for _ in range(n)]
    hook = None
    if on_token is not None:
        def hook(i: int, j: int, t: int, token: int, lp: float) -> None:
            on_token((job.first + i) * n + j, t, token, lp)
    try:
        groups = await batcher.submit(job.prompts, engine_params(job.params, job.opts), rids=rids, on_tokens=hook)
    except RequestAborted as e:
        return [empty_result(p, job.opts, {"type": "abort", "message": str(e), "status_code": None,
                                           "err_type": None}) for p in job.prompts for _ in range(n)]
    return [postprocess(s, job.params, job.opts, tokenizer=tokenizer, eos_ids=eos_ids) for g in groups for s in g]


async def run_generate(req: GenerateRequest, *, batcher: DynamicBatcher, tokenizer: Any, eos_ids: list[int],
                       score: Score, on_token: Optional[OnToken] = None) -> list[Result]:
    """All answer objects of `req`, prompt-major (every sample of prompt 0, then prompt 1, ...).
    `on_token(k, t, token, logprob)`: each decoded token t of answer k, as the engine makes it."""
    n = req.jobs[0].params.n
    per_job = [req.rids[job.first * n:(job.first + len(job.prompts)) * n] for job in req.jobs]
    outs = await asyncio.gather(*(_run_job(j, r, batcher=batcher, tokenizer=tokenizer, eos_ids=eos_ids,
                                           on_token=on_token)
                                  for j, r in zip(req.jobs, per_job)))
    results = [r for out in outs for r in out]
    if req.return_logprob:
        for r in results:
            await _add_scores(r, req, score)
    return results


async def _add_scores(r: Result, req: GenerateRequest, score: Score) -> None:
    """input_token_logprobs from logprob_start_len (-1: none), and top log-probs (SGLang's layout)."""
    p = len(r.prompt_ids)
    start = p if req.logprob_start_len < 0 else min(req.logprob_start_len, p)
    top_n = req.top_logprobs_num
    if start >= p and top_n == 0:
        r.input_lps = []
        return
    ids = r.prompt_ids + r.output_ids
    lps, tops = await score(ids, r.temperature, start, top_n)
    first = max(start, 1)
    n_in = p - first  # scored prompt positions (the output ones follow)
    lead = [(None, r.prompt_ids[0])] if start == 0 else []
    r.input_lps = lead + [(lp, t) for lp, t in zip(lps[:n_in], r.prompt_ids[first:])]
    if top_n > 0:
        r.input_top = ([None] if start == 0 else []) + tops[:n_in]
        r.output_top = tops[n_in:]  # output token j was drawn from the distribution at position p - 1 + j


# ------------------------------------------------------------------ streaming
@dataclass
class Chunk:
    """One streamed event of answer `index`: a partial answer (`done` False) or the final one."""

    index: int
    result: Result
    text: str  # cumulative text shown so far (the final: text_of(result))
    done: bool


class _Partial:
    """One answer while it decodes: its tokens, and the text that may be shown (incremental detokenizing)."""

    def __init__(self, prompt: list[int], job: Job, eos_ids: list[int], tokenizer: Any) -> None:
        self.prompt, self.job, self.tok = prompt, job, tokenizer
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.text = ""  # decoded text of ids[:read]
        self.prefix, self.read = 0, 0  # offsets of the incremental decode (as vLLM / TGI detokenize)
        self.shown = ""
        self.finished = False  # a stop was met: no more partial chunks
        params = job.params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.tail = _tail_tokens(tokenizer, job.opts.stop_strs) if job.opts.stop_strs else 0

    def add(self, t: int, token: int, lp: float) -> bool:
        """Token t arrived; True when a partial chunk should be sent."""
        if self.finished:
            return False
        if t != len(self.ids):  # a failed batch was run again (batcher): this answer starts over at t
            del self.ids[t:], self.lps[t:]
            self.text = self._decode(self.ids)
            self.prefix = self.read = len(self.ids)
        self.ids.append(token)
        self.lps.append(lp)
        if self._stopped() or len(self.ids) >= self.job.params.max_new_tokens:  # the final object carries it
            self.finished = True
            return False
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        shown = self.text[:len(self.text) - self._hold(self.text)]
        if len(shown) > len(self.shown) and shown.startswith(self.shown):
            self.shown = shown
        return True

    def result(self) -> Result:
        return Result(prompt_ids=list(self.prompt), output_ids=list(self.ids), logprobs=list(self.lps),
                      finish={"type": "length"}, opts=self.job.opts, temperature=self.job.params.temperature)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.job.opts.skip_special_tokens)

    def _stopped(self) -> bool:
        """Has the answer met a stop (where `postprocess` will cut it)? Checked on the newest token only."""
        opts, ids = self.job.opts, self.ids
        if ids[-1] in self.stop_ids and len(ids) > opts.min_new_tokens:
            return True
        if opts.stop_strs and any(s in self.tok.decode(ids[-self.tail:]) for s in opts.stop_strs):
            return True
        return bool(opts.stop_regex) and any(re.search(p, self.tok.decode(ids)) for p in opts.stop_regex)

    def _hold(self, text: str) -> int:
        """How many trailing characters could be the start of a stop string (not shown yet)."""
        hold = 0
        for s in self.job.opts.stop_strs:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold


async def stream_generate(req: GenerateRequest, *, batcher: DynamicBatcher, tokenizer: Any, eos_ids: list[int],
                          score: Score) -> AsyncIterator[Chunk]:
    """`run_generate` as a stream of `Chunk`s (see the module docstring); cancelling it aborts the decode."""
    n = req.jobs[0].params.n
    after_decode = req.return_logprob and (req.logprob_start_len >= 0 or req.top_logprobs_num > 0)
    parts: list[_Partial] = []
    for job in req.jobs:
        parts += [_Partial(p, job, eos_ids, tokenizer) for p in job.prompts for _ in range(n)]
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(run_generate(
        req, batcher=batcher, tokenizer=tokenizer, eos_ids=eos_ids, score=score,
        on_token=None if after_decode else (lambda k, t, token, lp: queue.put_nowait((k, t, token, lp)))))
    try:
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            events = [getter.result()]
            while not queue.empty():
                events.append(queue.get_nowait())
            for k, t, token, lp in events:
                if parts[k].add(t, token, lp):
                    yield Chunk(k, parts[k].result(), parts[k].shown, False)
        results = await task
    finally:
        if not task.done():  # the client went away: its decode is aborted (the batcher's future is cancelled)
            task.cancel()
    for k, r in enumerate(results):
        if after_decode:
            for upto, text in enumerate(stream_texts(r, tokenizer)[:-1], start=1):
                yield Chunk(k, truncated(r, upto), text, False)
        yield Chunk(k, r, text_of(r, tokenizer), True)


def truncated(r: Result, upto: int) -> Result:
    """The first `upto` output tokens of `r` as a partial answer."""
    return replace(r, output_ids=r.output_ids[:upto], logprobs=r.logprobs[:upto], finish={"type": "length"},
                   output_top=(r.output_top or [])[:upto] or None)


# ------------------------------------------------------------------ formatting
def _triples(pairs: list, tokenizer: Any, with_text: bool) -> list:
    return [[lp, t, tokenizer.decode([t]) if with_text else None] for lp, t in pairs]


def text_of(r: Result, tokenizer: Any) -> str:
    """The answer's text, trimmed as SGLang's detokenizer trims a matched stop."""
    matched = r.finish.get("matched")
    ids = r.output_ids
    if isinstance(matched, int) and not r.opts.no_stop_trim and ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=r.opts.skip_special_tokens)
    if isinstance(matched, str):
        pos = text.find(matched)
        if pos != -1:
            text = text[:pos + len(matched)] if r.opts.no_stop_trim else text[:pos]
    return text


def stream_texts(r: Result, tokenizer: Any) -> list[str]:
    """Cumulative text after each output token, as prefixes of the final (trimmed) text.

    A stop string is never shown and then taken back, and a token that ends inside a UTF-8 character shows
    nothing until the character is complete (SGLang holds such text back too)."""
    final = text_of(r, tokenizer)
    out, shown = [], 0
    for k in range(1, len(r.output_ids) + 1):
        t = tokenizer.decode(r.output_ids[:k], skip_special_tokens=r.opts.skip_special_tokens)
        if not t.endswith("\ufffd"):
            shown = max(shown, min(len(t), len(final)))
        out.append(final[:shown])
    if out:
        out[-1] = final
    return out


def format_result(r: Result, req: GenerateRequest, rid: str, *, tokenizer: Any, weight_version: str,
                  started: float, done: bool = True, text: Optional[str] = None) -> dict:
    """SGLang's answer object; done=False formats a streaming chunk of a partial answer (no finish reason yet)
    whose cumulative text is `text` (see `stream_generate`)."""
    part = r
    meta: dict[str, Any] = {"id": rid, "finish_reason": r.finish if done else None,
                            "prompt_tokens": len(r.prompt_ids), "weight_version": weight_version,
                            "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": len(part.output_ids),
                            "cached_tokens": 0, "e2e_latency": time.monotonic() - started}
    if req.return_logprob:
        with_text = req.return_text_in_logprobs
        meta["input_token_logprobs"] = _triples(r.input_lps or [], tokenizer, with_text)
        meta["output_token_logprobs"] = _triples(list(zip(part.logprobs, part.output_ids)), tokenizer, with_text)
        meta["output_token_logprobs_length"] = len(part.output_ids)
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = [None if x is None else _triples(x, tokenizer, with_text)
                                          for x in (r.input_top or [])]
            meta["output_top_logprobs"] = [_triples(x, tokenizer, with_text) for x in (part.output_top or [])]
    if text is None:
        text = text_of(r, tokenizer)
    return {"text": text, "output_ids": list(part.output_ids), "meta_info": meta}
