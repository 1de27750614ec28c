"""SGLang's native `/generate` wire format: parse and bound a request body, format the answer.

Read against SGLang 0.5.23 (python/sglang/srt/): `managers/io_struct.py`
`GenerateReqInput` (text | input_ids, one prompt or a list; `sampling_params` a
dict or one dict per prompt; `rid`; `return_logprob`, `logprob_start_len`
(-1 = output tokens only), `top_logprobs_num`, `return_text_in_logprobs`,
`stream`; a string `rid` of a batch becomes `rid_0, rid_1, ...`);
`sampling/sampling_params.py` (defaults: max_new_tokens 128, temperature 1,
top_k all; `verify()`'s ranges; at most 32 stop strings, 32 stop regexes of at
most 256 bytes; `sampling_seed` in int64); `entrypoints/http_server.py`
(validation errors are 400 `{"error": {"message"}}`); `managers/schedule_batch.py`
(finish reasons `{"type": "stop", "matched": token id | stop string | regex}`,
`{"type": "length", "length": n}`, `{"type": "abort", "message"}`).

Penalties (`repetition_penalty` in (0, 2], `frequency_penalty` and
`presence_penalty` in [-2, 2]), `min_p` in [0, 1] and `logit_bias` (token-id
string keys in [0, V), finite values) are checked with `verify()`'s ranges and
sampled with SGLang's semantics (`megaent.rollout.penalties`, `sampling.sample_next`)
once the engine's `SamplingParams` carries them (`ENGINE_PENALTIES`); until then
a non-neutral value is a 400 naming the field.

Where megaent departs (the engine samples with temperature / top-p / top-k and
token stops only): stop strings, stop regexes and `min_new_tokens` are applied
to the finished decode by `megaent.rollout.generation` (same results as SGLang
for stop strings; `min_new_tokens` cannot forbid an early EOS, it only refuses
to stop on it); grammars (regex / json_schema / ebnf) are a 400 naming the
field; `ignore_eos` ignores EOS only
(SGLang's also ignores `stop_token_ids`; megaent's trainer relies on stop ids with ignore_eos). Unknown top-level and
sampling keys are ignored (logged at debug), as SGLang ignores fields it does
not use; values of known fields are checked and a bad one is a 400 naming it.

Input bounds (issue 21, point 8): the body is at most `MAX_BODY_BYTES`
(aiohttp's client_max_size) and `MAX_DEPTH` levels deep; strings must be valid
Unicode (no lone surrogates); every number is finite and in range; prompt +
max_new_tokens must fit the context.
"""
from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from megaent.rollout.types import Sample, SamplingParams

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 32 * 2**20
MAX_DEPTH = 32
MAX_ROWS = 4096  # prompts x n of one request
MAX_STOP = 32
MAX_STOP_REGEX_BYTES = 256
INT64 = 2**63
_NEUTRAL = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
# The engine's SamplingParams takes the penalty fields (megaent.rollout.types; see the module docstring).
ENGINE_PENALTIES = all(k in SamplingParams.__dataclass_fields__ for k in (*_NEUTRAL, "logit_bias"))
_GRAMMARS = ("regex", "json_schema", "ebnf", "structural_tag")


class BadRequest(ValueError):
    """A request megaent cannot accept; the message names the field, the value and the fix."""


def error_body(message: str, code: int = 400) -> dict:
    """SGLang's `/generate` error body (http_server.py `_create_error_response`)."""
    return {"error": {"message": message}}


def openai_error_body(message: str, code: int = 400) -> dict:
    """SGLang's OpenAI-route `ErrorResponse`."""
    return {"object": "error", "message": message, "type": "Bad Request" if code == 400 else "Internal Server Error",
            "param": None, "code": code}


# ------------------------------------------------------------------ body bounds
def loads_body(raw: bytes) -> Any:
    """Bytes -> JSON value, refusing what is not JSON, too deep, or not valid Unicode (BadRequest)."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"request body: JSON nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, int past Python's digit limit
        raise BadRequest(f"request body is not valid JSON ({e}); send a JSON object") from None
    check_json(obj)
    return obj


def check_json(obj: Any) -> None:
    """Depth <= MAX_DEPTH and no lone surrogates in any string (keys included); BadRequest names the path."""
    stack: list[tuple[Any, str, int]] = [(obj, "body", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"{path}: JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, str):
            _check_str(v, path)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_str(k, f"{path} key")
                stack.append((x, k if path == "body" else f"{path}.{k}", depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _check_str(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{path}: contains a lone UTF-16 surrogate at index {e.start}; send valid Unicode") from None


# ------------------------------------------------------------------ typed field readers
def get_int(d: dict, key: str, default: Optional[int], *, where: str, lo: int, hi: int) -> Optional[int]:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and abs(v) < INT64:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{where}{key}={v!r}: must be an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"{where}{key}={v}: must be in [{lo}, {hi}]")
    return v


def get_float(d: dict, key: str, default: float, *, where: str, lo: float, hi: float,
              lo_open: bool = False) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{where}{key}={v!r}: must be a number")
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise BadRequest(f"{where}{key}={v}: must be a finite number in {'(' if lo_open else '['}{lo}, {hi}]")
    return v


def get_bool(d: dict, key: str, default: bool, *, where: str) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{where}{key}={v!r}: must be true or false")
    return v


def _str_list(v: Any, key: str, *, where: str, limit: int) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or any(not isinstance(s, str) for s in items):
        raise BadRequest(f"{where}{key}={v!r}: must be a string or a list of strings")
    if len(items) > limit:
        raise BadRequest(f"{where}{key}: {len(items)} entries; at most {limit} are allowed")
    return tuple(s for s in items if s)


# ------------------------------------------------------------------ sampling params
@dataclass(frozen=True)
class Options:
    """What the server does around the engine for one prompt (see megaent.rollout.generation)."""

    max_new_tokens: int = 128
    """May be 0 (SGLang: prefill only, e.g. the frontend's prefix caching); the engine is then not called."""
    min_new_tokens: int = 0
    stop_strs: tuple[str, ...] = ()
    stop_regex: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False


def parse_sampling_params(sp: Any, *, where: str = "sampling_params.", vocab_size: int
                          ) -> tuple[SamplingParams, Options]:
    """One SGLang `sampling_params` dict -> (engine SamplingParams, server Options); BadRequest names the key."""
    sp = {} if sp is None else sp
    if not isinstance(sp, dict):
        raise BadRequest(f"{where[:-1]}: expected a JSON object, got {type(sp).__name__}")
    for key in _GRAMMARS:
        if sp.get(key):
            raise BadRequest(f"{where}{key}: constrained decoding is not supported by megaent serve; omit it")
    penalties = _penalties(sp, where=where, vocab_size=vocab_size)
    custom = sp.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise BadRequest(f"{where}custom_params={custom!r}: must be a JSON object")  # no processor reads it here
    unknown = set(sp) - _SAMPLING_KEYS
    if unknown:
        log.debug("ignoring sampling_params keys %s", sorted(unknown))
    max_new = get_int(sp, "max_new_tokens", 128, where=where, lo=0, hi=INT64 - 1)
    min_new = get_int(sp, "min_new_tokens", 0, where=where, lo=0, hi=max_new)
    temperature = get_float(sp, "temperature", 1.0, where=where, lo=0.0, hi=1e6)
    top_p = get_float(sp, "top_p", 1.0, where=where, lo=0.0, hi=1.0, lo_open=True)
    top_k = get_int(sp, "top_k", -1, where=where, lo=-1, hi=INT64 - 1)
    if top_k == 0:
        raise BadRequest(f"{where}top_k=0: must be -1 (disable) or at least 1")
    top_k = -1 if top_k >= vocab_size else top_k  # keeping every token is "off"
    n = get_int(sp, "n", 1, where=where, lo=1, hi=MAX_ROWS)
    seed = get_int(sp, "sampling_seed", None, where=where, lo=-INT64, hi=INT64 - 1)
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or len(stop_ids) > 1024 or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in stop_ids):
        raise BadRequest(f"{where}stop_token_ids={stop_ids!r:.200}: must be a list of token ids in [0, {vocab_size})")
    stop_regex = _str_list(sp.get("stop_regex"), "stop_regex", where=where, limit=MAX_STOP)
    for pattern in stop_regex:
        if len(pattern.encode()) > MAX_STOP_REGEX_BYTES:
            raise BadRequest(f"{where}stop_regex: a pattern of {len(pattern.encode())} bytes; at most "
                             f"{MAX_STOP_REGEX_BYTES} are allowed")
        try:
            re.compile(pattern)
        except (re.error, RecursionError) as e:
            raise BadRequest(f"{where}stop_regex={pattern!r}: not a valid regular expression ({e})") from None
    opts = Options(max_new_tokens=max_new, min_new_tokens=min_new,
                   stop_strs=_str_list(sp.get("stop"), "stop", where=where, limit=MAX_STOP), stop_regex=stop_regex,
                   skip_special_tokens=get_bool(sp, "skip_special_tokens", True, where=where),
                   spaces_between_special_tokens=get_bool(sp, "spaces_between_special_tokens", True, where=where),
                   no_stop_trim=get_bool(sp, "no_stop_trim", False, where=where))
    ignore_eos = get_bool(sp, "ignore_eos", False, where=where)
    params = SamplingParams(n=n, max_new_tokens=max(1, max_new), temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos, seed=seed, **penalties)
    return params, opts


def _penalties(sp: dict, *, where: str, vocab_size: int) -> dict:
    """The penalty / min_p / logit_bias fields of SamplingParams (SGLang `verify()`'s ranges); {} when neutral."""
    out: dict[str, Any] = {
        "min_p": get_float(sp, "min_p", 0.0, where=where, lo=0.0, hi=1.0),
        "repetition_penalty": get_float(sp, "repetition_penalty", 1.0, where=where, lo=0.0, hi=2.0, lo_open=True),
        "frequency_penalty": get_float(sp, "frequency_penalty", 0.0, where=where, lo=-2.0, hi=2.0),
        "presence_penalty": get_float(sp, "presence_penalty", 0.0, where=where, lo=-2.0, hi=2.0),
        "logit_bias": _logit_bias(sp.get("logit_bias"), where=where, vocab_size=vocab_size)}
    active = {k: v for k, v in out.items() if v != _NEUTRAL.get(k, ())}
    if not active:
        return {}
    if not ENGINE_PENALTIES:
        key = next(iter(active))
        raise BadRequest(f"{where}{key}={sp.get(key)!r:.80}: this megaent build's engine samples without logit "
                         f"penalties, min_p or logit_bias; leave it at {_NEUTRAL.get(key, '{}')}")
    return out


def _logit_bias(bias: Any, *, where: str, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """SGLang's logit_bias {"token id": bias} -> sorted ((id, bias), ...); keys that name the same id: the last wins."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest(f"{where}logit_bias={bias!r:.80}: must be a JSON object of token id -> bias")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except ValueError:
            raise BadRequest(f"{where}logit_bias: key {k!r:.40} is not a token id") from None
        if not 0 <= t < vocab_size:
            raise BadRequest(f"{where}logit_bias: key {k!r:.40} must be a token id in [0, {vocab_size - 1}]")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadRequest(f"{where}logit_bias[{k!r:.40}]={v!r:.40}: must be a finite number")
        out[t] = float(v)
    return tuple(sorted(out.items()))


_SAMPLING_KEYS = {"max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "n", "sampling_seed",
                  "stop", "stop_token_ids", "stop_regex", "ignore_eos", "skip_special_tokens", "no_stop_trim",
                  "spaces_between_special_tokens", "logit_bias", "custom_params", "stream_interval",
                  *_NEUTRAL, *_GRAMMARS}
_TOP_KEYS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
             "top_logprobs_num", "return_text_in_logprobs", "stream"}


# ------------------------------------------------------------------ /generate
@dataclass
class Job:
    """Prompts that share one SamplingParams: one engine job (seeded streams keyed by index in `prompts`)."""

    prompts: list[list[int]]
    params: SamplingParams
    opts: Options
    first: int  # index of prompts[0] in the request


@dataclass
class GenerateRequest:
    jobs: list[Job]
    n_prompts: int
    single: bool  # one prompt, n = 1: the answer is one object, not a list
    rids: list[str]  # one per answer object, prompt-major
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    meta: dict = field(default_factory=dict)


def _prompts(body: dict, *, tokenizer: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("text / input_ids: give exactly one of them")
    if text is not None:
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not texts or any(not isinstance(t, str) for t in texts):
            raise BadRequest("text: must be a string or a non-empty list of strings")
        prompts = [tokenizer.encode(t) for t in texts]
        if any(len(p) == 0 for p in prompts):
            raise BadRequest("text: a prompt encodes to zero tokens")
        return prompts, single
    single = isinstance(ids, list) and bool(ids) and all(not isinstance(t, list) for t in ids)
    prompts = [ids] if single else ids
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("input_ids: must be a list of token ids or a non-empty list of such lists")
    for i, p in enumerate(prompts):
        where = "input_ids" if single else f"input_ids[{i}]"
        if not isinstance(p, list) or not p:
            raise BadRequest(f"{where}: must be a non-empty list of token ids")
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise BadRequest(f"{where}: token id {t!r:.40} is not an integer in [0, {vocab_size})")
    return prompts, single


def check_context(prompt_len: int, max_new_tokens: int, *, context_len: int, field_name: str = "max_new_tokens"
                  ) -> None:
    """SGLang's tokenizer_manager check: the prompt, then prompt + max_new_tokens, must fit the context."""
    if prompt_len >= context_len:
        raise BadRequest(f"input: the input ({prompt_len} tokens) is longer than the model's context length "
                         f"({context_len} tokens)")
    if prompt_len + max_new_tokens > context_len:
        raise BadRequest(f"{field_name}={max_new_tokens}: requested token count exceeds the model's maximum context "
                         f"length of {context_len} tokens ({prompt_len} input + {max_new_tokens} new); lower "
                         f"{field_name}")


def parse_generate(body: Any, *, tokenizer: Any, vocab_size: int, context_len: int) -> GenerateRequest:
    """A `/generate` JSON body -> GenerateRequest; BadRequest names the bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body: expected a JSON object, got {type(body).__name__}")
    unknown = set(body) - _TOP_KEYS
    if unknown:
        log.debug("ignoring /generate fields %s", sorted(unknown))
    prompts, single = _prompts(body, tokenizer=tokenizer, vocab_size=vocab_size)
    sps = body.get("sampling_params")
    if isinstance(sps, list):
        if single or len(sps) != len(prompts):
            raise BadRequest(f"sampling_params: a list of {len(sps)} dicts needs exactly one per prompt "
                             f"({len(prompts)} prompts given as a list)")
        parsed = [parse_sampling_params(sp, where=f"sampling_params[{i}].", vocab_size=vocab_size)
                  for i, sp in enumerate(sps)]
        if len({p.n for p, _ in parsed}) > 1:
            raise BadRequest("sampling_params[*].n: must be the same for every prompt (SGLang's rule)")
        jobs = [Job([p], prm, o, i) for i, (p, (prm, o)) in enumerate(zip(prompts, parsed))]
    else:
        prm, o = parse_sampling_params(sps, vocab_size=vocab_size)
        jobs = [Job(prompts, prm, o, 0)]
    n = jobs[0].params.n
    if len(prompts) * n > MAX_ROWS:
        raise BadRequest(f"sampling_params.n={n}: {len(prompts)} prompts x n = {len(prompts) * n} samples; at most "
                         f"{MAX_ROWS} per request")
    for job in jobs:
        for p in job.prompts:
            check_context(len(p), job.opts.max_new_tokens, context_len=context_len)
    return_logprob = get_bool(body, "return_logprob", False, where="")
    top_n = get_int(body, "top_logprobs_num", 0, where="", lo=0, hi=vocab_size)
    start = get_int(body, "logprob_start_len", -1, where="", lo=-1, hi=INT64 - 1)
    single = single and n == 1
    return GenerateRequest(jobs=jobs, n_prompts=len(prompts), single=single,
                           rids=_rids(body.get("rid"), len(prompts), n, single),
                           return_logprob=return_logprob, logprob_start_len=start, top_logprobs_num=top_n,
                           return_text_in_logprobs=get_bool(body, "return_text_in_logprobs", False, where=""),
                           stream=get_bool(body, "stream", False, where=""))


def _rids(rid: Any, n_prompts: int, n: int, single: bool) -> list[str]:
    """One id per answer object (io_struct `_normalize_rid`: a batch's string rid becomes rid_0, rid_1, ...)."""
    total = n_prompts * n
    if rid is None:
        return [uuid.uuid4().hex for _ in range(total)]
    if isinstance(rid, str):
        return [rid] if single else [f"{rid}_{k}" for k in range(total)]
    if isinstance(rid, list) and len(rid) == n_prompts and all(isinstance(r, str) for r in rid):
        return [r if n == 1 else f"{r}_{j}" for r in rid for j in range(n)]
    raise BadRequest(f"rid={rid!r:.80}: must be a string or a list of one string per prompt")


def parse_sample(obj: dict, prompt_ids: list[int]) -> Sample:
    """One SGLang response object (with return_logprob) -> Sample; used by the client."""
    meta = obj.get("meta_info", {})
    lps = meta.get("output_token_logprobs")
    if lps is None:
        raise ValueError("response has no meta_info.output_token_logprobs; send return_logprob=true")
    ids = [int(x[1]) for x in lps]
    out_ids = obj.get("output_ids", ids)
    if list(out_ids) != ids:
        raise ValueError("output_ids and output_token_logprobs disagree (server trimmed a token?)")
    fr = meta.get("finish_reason") or {}
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    if kind not in ("stop", "length"):
        raise ValueError(f"finish_reason {fr!r}: the server aborted the request")
    matched = fr.get("matched") if isinstance(fr, dict) else None
    return Sample(prompt_ids=list(prompt_ids), output_ids=ids, logprobs=[float(x[0]) for x in lps],
                  finish_reason=kind, matched_stop=matched if isinstance(matched, int) else None)
