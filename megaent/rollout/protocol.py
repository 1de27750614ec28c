"""The SGLang HTTP wire format megaent speaks: parse `/generate` bodies, format responses.

Checked against SGLang's own source (sgl-project/sglang, python/sglang/srt/):
- entrypoints/http_server.py: `/generate` takes a `GenerateReqInput`; `/health`
  and `/health_generate` answer 200 / 503; `/get_model_info` returns
  `model_path, tokenizer_path, is_generation, preferred_sampling_params,
  weight_version`; `/update_weights_from_disk` returns `{"success", "message",
  "num_paused_requests"}` with 200 or 400; `/flush_cache` answers plain text;
  request-validation errors are 400 with an `ErrorResponse` body
  `{"object": "error", "message", "type": "Bad Request", "param", "code": 400}`.
- managers/io_struct.py `GenerateReqInput`: `text` or `input_ids` (one prompt or
  a list), `sampling_params`, `return_logprob`, `logprob_start_len`,
  `top_logprobs_num`, `return_text_in_logprobs`, `stream`, `rid`;
  `UpdateWeightFromDiskReqInput`: `model_path`, `load_format`,
  `abort_all_requests`, `weight_version`.
- sampling/sampling_params.py: `max_new_tokens, temperature, top_p, top_k,
  stop_token_ids, n, ignore_eos, sampling_seed, skip_special_tokens, no_stop_trim`
  (unknown keys make SamplingParams(**d) fail).
- managers/tokenizer_manager.py `_handle_batch_request`: with n > 1 (or a list
  input) the response is a flat list, prompt-major (all n samples of prompt 0,
  then prompt 1, ...); `meta_info.output_token_logprobs` is a list of
  `[logprob, token_id, token_text_or_None]`; managers/schedule_batch.py
  finish reasons are `{"type": "stop", "matched": id}` / `{"type": "length",
  "length": n}`; `output_ids` keep the matched stop token, `text` drops it
  unless `no_stop_trim`.
Not implemented (400 when set to a non-default value): penalties, min_p,
string stops, grammars, streaming, top log-probs, input-token log-probs.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional

from megaent.rollout.types import Sample, SamplingParams


class BadRequest(ValueError):
    """A request field megaent cannot accept; the message names the field and the fix."""


_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "n", "ignore_eos",
                  "sampling_seed", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"}
# SGLang keys accepted only at their neutral value.
_NEUTRAL_SAMPLING = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                     "min_new_tokens": 0, "stop": None, "json_schema": None, "regex": None, "ebnf": None,
                     "structural_tag": None, "logit_bias": None, "custom_params": None, "stream_interval": None}
_TOP_KEYS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
             "return_text_in_logprobs", "stream", "rid", "log_metrics", "token_ids_logprob", "lora_path",
             "custom_logit_processor", "return_hidden_states", "bootstrap_host", "bootstrap_room", "priority"}


@dataclass
class GenerateRequest:
    prompts: list[list[int]]
    params: SamplingParams
    single: bool  # one prompt and n == 1: the response is one object, not a list
    return_logprob: bool
    return_text_in_logprobs: bool
    skip_special_tokens: bool
    no_stop_trim: bool


def error_body(message: str, code: int = 400) -> dict:
    """SGLang's ErrorResponse shape."""
    return {"object": "error", "message": message, "type": "Bad Request" if code == 400 else "Internal Server Error",
            "param": None, "code": code}


def _int(d: dict, key: str, default: int, *, prefix: str) -> int:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise BadRequest(f"{prefix}.{key}={v!r}: must be an integer")
    return int(v)


def _float(d: dict, key: str, default: float, *, prefix: str) -> float:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{prefix}.{key}={v!r}: must be a number")
    return float(v)


def parse_sampling_params(sp: Any) -> tuple[SamplingParams, bool, bool]:
    """`sampling_params` dict -> (SamplingParams, skip_special_tokens, no_stop_trim); BadRequest names the key."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise BadRequest(f"sampling_params: expected a JSON object, got {type(sp).__name__}")
    for key, value in sp.items():
        if key in _NEUTRAL_SAMPLING:
            if value not in (_NEUTRAL_SAMPLING[key], None, [], ""):
                raise BadRequest(f"sampling_params.{key}={value!r}: not supported by megaent serve; "
                                 f"leave it at {_NEUTRAL_SAMPLING[key]!r} (or use SGLang)")
        elif key not in _SAMPLING_KEYS:
            raise BadRequest(f"sampling_params.{key}: unknown key; supported: {', '.join(sorted(_SAMPLING_KEYS))}")
    stop = sp.get("stop_token_ids") or []
    if not isinstance(stop, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in stop):
        raise BadRequest(f"sampling_params.stop_token_ids={stop!r}: must be a list of integer token ids")
    seed = sp.get("sampling_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"sampling_params.sampling_seed={seed!r}: must be an integer or null")
    p = "sampling_params"
    try:
        params = SamplingParams(
            n=_int(sp, "n", 1, prefix=p), max_new_tokens=_int(sp, "max_new_tokens", 128, prefix=p),
            temperature=_float(sp, "temperature", 1.0, prefix=p), top_p=_float(sp, "top_p", 1.0, prefix=p),
            top_k=_int(sp, "top_k", -1, prefix=p), stop_token_ids=tuple(stop),
            ignore_eos=bool(sp.get("ignore_eos", False)), seed=seed)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return params, bool(sp.get("skip_special_tokens", True)), bool(sp.get("no_stop_trim", False))


def parse_generate(body: Any, *, tokenizer: Any, vocab_size: int) -> GenerateRequest:
    """A `/generate` JSON body -> GenerateRequest; BadRequest names the bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body: expected a JSON object, got {type(body).__name__}")
    for key in body:
        if key not in _TOP_KEYS:
            raise BadRequest(f"{key}: unknown field; megaent serve accepts {', '.join(sorted(_TOP_KEYS))}")
    if body.get("stream"):
        raise BadRequest("stream=true: streaming is not supported by megaent serve; send stream=false")
    if body.get("top_logprobs_num"):
        raise BadRequest("top_logprobs_num: top log-probs are not supported by megaent serve; leave it 0")
    params, skip_special, no_trim = parse_sampling_params(body.get("sampling_params"))
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
    else:
        single = isinstance(ids, list) and bool(ids) and all(isinstance(t, int) for t in ids)
        prompts = [ids] if single else ids
        if not isinstance(prompts, list) or not prompts:
            raise BadRequest("input_ids: must be a list of token ids or a non-empty list of such lists")
        for i, p in enumerate(prompts):
            where = "input_ids" if single else f"input_ids[{i}]"
            if not isinstance(p, list) or not p:
                raise BadRequest(f"{where}: must be a non-empty list of token ids")
            for t in p:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                    raise BadRequest(f"{where}: token id {t!r} is not an integer in [0, {vocab_size})")
    return GenerateRequest(prompts=prompts, params=params, single=single and params.n == 1,
                           return_logprob=bool(body.get("return_logprob", False)),
                           return_text_in_logprobs=bool(body.get("return_text_in_logprobs", False)),
                           skip_special_tokens=skip_special, no_stop_trim=no_trim)


def format_sample(s: Sample, req: GenerateRequest, *, tokenizer: Any, weight_version: Optional[str]) -> dict:
    """One Sample -> SGLang's per-sample response object."""
    text_ids = s.output_ids[:-1] if (s.finish_reason == "stop" and not req.no_stop_trim) else s.output_ids
    if s.finish_reason == "stop":
        finish = {"type": "stop", "matched": s.matched_stop}
    else:
        finish = {"type": "length", "length": len(s.output_ids)}
    meta: dict[str, Any] = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(s.prompt_ids),
                            "completion_tokens": len(s.output_ids), "cached_tokens": 0,
                            "weight_version": weight_version}
    if req.return_logprob:
        texts = ([tokenizer.decode([t]) for t in s.output_ids] if req.return_text_in_logprobs
                 else [None] * len(s.output_ids))
        meta["output_token_logprobs"] = [[lp, t, x] for lp, t, x in zip(s.logprobs, s.output_ids, texts)]
    return {"text": tokenizer.decode(text_ids, skip_special_tokens=req.skip_special_tokens),
            "output_ids": list(s.output_ids), "meta_info": meta}


def format_response(samples: list[list[Sample]], req: GenerateRequest, *, tokenizer: Any,
                    weight_version: Optional[str]) -> Any:
    """samples[i][j] -> one object (single prompt, n = 1) or a prompt-major flat list."""
    flat = [format_sample(s, req, tokenizer=tokenizer, weight_version=weight_version) for row in samples for s in row]
    return flat[0] if req.single else flat


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
