"""`EmbeddedEngine`: batched sampling on the megaent Policy in this process (any TP, PP = 1).

One decode loop serves many requests at once (`generate_many`), each with its
own sampling options: rows are prompt x sample, prompts are left-padded to one
length and masked with a key-padding `attention_mask`, the KV cache is
preallocated for prompt + max new tokens, and every per-row option
(temperature, top-p, top-k, min-p, penalties, stop ids, max new tokens, random stream) is a
tensor, so a decode step is one forward plus a fixed number of batched ops,
never a Python loop over rows. Rows that finish stop appending at once; when
at least half of the live rows have finished, the batch (KV cache included)
is compacted so they stop costing compute too.

Tensor parallelism: every TP rank runs this same loop in lockstep. The last
position's vocab-sharded logits [B, Vl] are all-gathered over `tp_group` (one
all-gather per step, B x V floats) and every rank samples from the same full
logits with the same counter-based random numbers (`sampling.counter_uniform`),
so all ranks draw the same tokens without a broadcast. Logit penalties and
logit_bias (`megaent.rollout.penalties`) transform the full logits before
sampling, per row, when a row of the batch asks for them.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.rollout.engine import check_prompts
from megaent.rollout.penalties import PenaltyRows
from megaent.rollout.runner import DecodeRunner
from megaent.rollout.sampling import counter_uniform, row_keys, sample_next
from megaent.rollout.types import RolloutError, Sample, SamplingParams

log = logging.getLogger(__name__)
_ENGINE_IDS = itertools.count()


def gather_vocab(logits: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """logits [B, Vl] (this TP rank's vocab shard) -> [B, Vl * TP] in vocab order; one all-gather on `group`."""
    if group is None or dist.get_world_size(group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def read_eos_ids(hf_dir: str | Path) -> list[int]:
    """EOS token ids from config.json / generation_config.json (int or list); [] when absent."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = Path(hf_dir) / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            for t in (eos if isinstance(eos, list) else [eos]):
                if isinstance(t, int) and t not in ids:
                    ids.append(t)
    return ids


def _plain_attention(policy: Any) -> bool:
    """Whether the decode runner's attention (qkv -> RoPE -> attend over KV/TP local heads) is this model's: not
    for q/k-normed families (Qwen3) nor TP wider than the KV heads; those decode on the policy's own forward."""
    arch = getattr(policy, "arch", None)
    return arch is None or (not arch.qk_norm and policy.state.tp <= arch.num_key_value_heads)


@dataclass
class _Rows:
    """Per-row state of one decode batch (all tensors [B] unless noted)."""

    out_row: torch.Tensor  # index into the output buffers
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    max_new: torch.Tensor
    stop_ids: torch.Tensor  # [B, K] int64, -1 padded
    keys: torch.Tensor  # random-stream keys
    mask: torch.Tensor  # [B, P + M] bool key-padding mask
    next_pos: torch.Tensor  # position id of the next token

    def select(self, idx: torch.Tensor) -> "_Rows":
        return _Rows(**{k: v.index_select(0, idx) for k, v in self.__dict__.items()})


class EmbeddedEngine:
    """In-process rollout engine on a megaent `Policy` (PP = 1).

    `generate(prompts, params)` implements `RolloutEngine`. When it shares the
    trainer's policy object, weight sync is a no-op. Randomness: a request with
    `params.seed` draws from streams keyed by (seed, prompt index, sample index),
    reproducible across calls, batch compositions and TP sizes; without a seed
    the engine draws a fresh seed from its own `torch.Generator(seed)`.
    """

    def __init__(self, policy: Any, state: Any, *, eos_token_ids: Sequence[int] = (), seed: int = 0,
                 max_batch_rows: int = 256, pad_token_id: int = 0, prepack: Optional[bool] = None,
                 record_tapes: bool = False, tape_max_bytes: int = 2 << 30) -> None:
        if getattr(state, "pp", 1) != 1:
            raise RolloutError(f"the embedded engine needs parallel.pp=1 (got pp={state.pp}); use "
                               "rollout.engine=http with `megaent serve` for pipeline-parallel training")
        self.policy = policy
        self.state = state
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.max_batch_rows = max_batch_rows
        self.pad_token_id = pad_token_id
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.prepack = prepack
        self._runner: Optional[DecodeRunner] = None
        self._runner_of: Any = None  # the policy object `_runner` was decided for
        self.record_tapes, self.tape_max_bytes = record_tapes, tape_max_bytes
        self._tapes: dict[int, Any] = {}  # serial -> ActivationTape of a decode batch (until clear_tapes)
        self._tape_pool: Any = None  # megaent.model.tape.TapePool: released tapes' buffers, for the next ones
        self._tape_serial = 0
        self._tape_tag = f"{os.getpid()}-{next(_ENGINE_IDS)}"  # this engine's tapes only (no global RNG draw)
        # on_step(chunk, t, tokens [B], logprobs [B], lengths [B]) after decode step t, with every row's token of
        # that step (valid where lengths == t + 1): how `megaent serve` streams answers while they decode.
        self.on_step: Optional[Callable[[list, int, torch.Tensor, torch.Tensor, torch.Tensor], None]] = None

    @classmethod
    def from_hf(cls, hf_dir: str | Path, state: Any, *, dtype: torch.dtype = torch.float32, **kw: Any
                ) -> "EmbeddedEngine":
        from megaent.model import load_hf

        return cls(load_hf(str(hf_dir), state, dtype=dtype), state, eos_token_ids=read_eos_ids(hf_dir), **kw)

    def load_weights(self, hf_dir: str | Path) -> None:
        """Replace the policy by the checkpoint at `hf_dir` (same layout and dtype)."""
        from megaent.model import load_hf

        self.policy = load_hf(str(hf_dir), self.state, dtype=self.policy.dtype)

    # ---------------------------------------------------------------- rollout-forward reuse
    def clear_tapes(self) -> None:
        """Release the recorded activations of earlier decodes (`record_tapes`): their buffers go back to the pool
        for the next decode's tapes, and a replay that still holds one of them is refused."""
        if self._tape_pool is not None:
            self._tape_pool.trim()  # storage this decode did not reuse: the pool keeps one step's tapes at most
        for tape in self._tapes.values():
            tape.release()
        self._tapes.clear()

    def tape_row(self, sample: Sample) -> Optional[tuple[Any, int]]:
        """(ActivationTape, decode row) that recorded `sample`'s forward, or None (see megaent.model.tape)."""
        key = sample.meta.get("tape")
        if not isinstance(key, str) or not key.startswith(self._tape_tag + ":"):
            return None
        _, serial, row = key.rsplit(":", 2)
        tape = self._tapes.get(int(serial))
        return None if tape is None else (tape, int(row))

    def _new_tape(self, chunk: list, n_prompts: int, p_len: int, m: int) -> Any:
        from megaent.model.tape import ActivationTape, TapePool, param_stamp

        if not self.record_tapes or self._runner_for_policy() is None:
            return None
        shape = dict(n_prompts=n_prompts, prompt_pad_len=p_len, n_rows=len(chunk), max_new=m)
        need = ActivationTape.nbytes_for(self.policy, **shape)
        if need > self.tape_max_bytes:
            log.info("not recording the rollout forward: %.2f GiB > tape_max_bytes %.2f GiB", need / 2**30,
                     self.tape_max_bytes / 2**30)
            return None
        if self._tape_pool is None:
            self._tape_pool = TapePool()
        return ActivationTape(self.policy, stamp=param_stamp(self.policy), pool=self._tape_pool, **shape)

    @property
    def vocab_size(self) -> int:
        return int(self.policy.vocab_size)

    # ---------------------------------------------------------------- public API
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        """samples[i][j] = j-th of params.n samples of prompt i."""
        return self.generate_many([(prompts, params)])[0]

    def generate_many(self, jobs: Sequence[tuple[Sequence[Sequence[int]], SamplingParams]]
                      ) -> list[list[list[Sample]]]:
        """Several requests, each (prompts, params), decoded together; result[r][i][j] as in `generate`."""
        rows: list[tuple[int, int, int, list[int], SamplingParams, int]] = []  # (job, prompt, j, ids, params, seed)
        shaped: list[list[list[Optional[Sample]]]] = []
        for r, (prompts, params) in enumerate(jobs):
            ids = check_prompts(prompts, vocab_size=self.vocab_size)
            seed = params.seed if params.seed is not None else int(
                torch.randint(0, 2**62, (1,), generator=self._seed_gen))
            shaped.append([[None] * params.n for _ in ids])
            rows += [(r, i, j, p, params, seed) for i, p in enumerate(ids) for j in range(params.n)]
        # Similar prompt lengths share a chunk, so little padding is computed.
        order = sorted(range(len(rows)), key=lambda k: len(rows[k][3]))
        for start in range(0, len(order), self.max_batch_rows):
            chunk = [rows[k] for k in order[start:start + self.max_batch_rows]]
            for (r, i, j, *_), s in zip(chunk, self._decode(chunk)):
                shaped[r][i][j] = s
        return shaped  # type: ignore[return-value]

    # ---------------------------------------------------------------- decode loop
    def _build_rows(self, chunk: list, p_len: int, m: int, device: torch.device) -> tuple[_Rows, torch.Tensor]:
        b = len(chunk)
        host = torch.device("cpu")  # host-side setup, moved to the decoder's device once below
        input_ids = torch.full((b, p_len), self.pad_token_id, dtype=torch.long, device=host)
        mask = torch.zeros(b, p_len + m, dtype=torch.bool, device=host)
        stops = []
        for k, (_, _, _, ids, params, _) in enumerate(chunk):  # host-side setup, once per batch
            input_ids[k, p_len - len(ids):] = torch.tensor(ids, device=host)
            mask[k, p_len - len(ids):p_len] = True
            stops.append(list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids))
        width = max(1, max(len(s) for s in stops))
        stop_ids = torch.tensor([s + [-1] * (width - len(s)) for s in stops], dtype=torch.long, device=host)
        def f(attr: str, dt: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(c[4], attr) for c in chunk], dtype=dt, device=host)

        rows = _Rows(
            out_row=torch.arange(b, device=host), temperature=f("temperature", torch.float32),
            top_p=f("top_p", torch.float32),
            top_k=f("top_k", torch.long), min_p=f("min_p", torch.float32), max_new=f("max_new_tokens", torch.long),
            stop_ids=stop_ids,
            keys=row_keys(*(torch.tensor([c[i] for c in chunk], device=host) for i in (5, 1, 2))),
            mask=mask, next_pos=mask.sum(-1))
        return _Rows(**{k: v.to(device) for k, v in rows.__dict__.items()}), input_ids.to(device)

    def _runner_for_policy(self) -> Optional[DecodeRunner]:
        """The inference forward bound to the current `self.policy` (None: a layer backend it cannot read)."""
        if self._runner_of is not self.policy:  # once per policy object, not per decode step
            self._runner_of = self.policy
            self._runner = DecodeRunner(self.policy, prepack=self.prepack) \
                if DecodeRunner.supports(self.policy) and _plain_attention(self.policy) else None
        return self._runner

    def _last_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: Optional[torch.Tensor],
                     cache: Any, record: Any = None) -> torch.Tensor:
        """Forward the new tokens (mask: [B, S_k] key padding, None when no row is padded); full-vocabulary
        logits of the last position [B, V] (one TP all-gather). `record`: see `DecodeRunner.last_logits`; it
        also gets ("head", local logits [B, Vl]) with slot -1."""
        runner = self._runner_for_policy()
        if runner is not None:
            logits = runner.last_logits(input_ids, position_ids, key_mask=mask, cache=cache, record=record)
            if record is not None:
                record(-1, "head", logits)  # [B, Vl]
        else:
            hidden = self.policy.final_hidden(input_ids, position_ids, attention_mask=mask, kv_cache=cache)
            logits = self.policy.compute_logits(hidden[:, -1:])[:, 0]  # [B, Vl]: the head on the last position
        return gather_vocab(logits, self.state.tp_group if self.state.tp > 1 else None)[:, :self.vocab_size]

    @torch.no_grad()
    def _decode(self, chunk: list) -> list[Sample]:
        from megaent.model.cache import new_kv_cache

        device = self.state.device
        b0 = len(chunk)
        # a sliding-window checkpoint (Mistral v0.1) is exact up to its window only: refuse before decoding
        if getattr(self.policy, "arch", None) is not None:
            self.policy.arch.check_sequence_length(max(len(c[3]) + c[4].max_new_tokens for c in chunk))
        p_len = max(len(c[3]) for c in chunk)
        m = max(c[4].max_new_tokens for c in chunk)
        rows, input_ids = self._build_rows(chunk, p_len, m, device)
        any_min_p = any(c[4].min_p > 0 for c in chunk)
        any_trunc = any_min_p or any(c[4].top_p < 1.0 or c[4].top_k > 0 for c in chunk)
        # Penalties and logit_bias (megaent.rollout.penalties): None, and no cost, unless some row uses them.
        pen = PenaltyRows.for_params([c[4] for c in chunk], vocab_size=self.vocab_size, device=device)
        any_greedy = any(c[4].temperature <= 0 for c in chunk)
        unit_t = all(c[4].temperature == 1.0 for c in chunk)
        out_tok = torch.zeros(b0, m, dtype=torch.long, device=device)
        out_lp = torch.zeros(b0, m, dtype=torch.float32, device=device)
        out_len = torch.zeros(b0, dtype=torch.long, device=device)
        stopped = torch.zeros(b0, dtype=torch.bool, device=device)

        # Prefill each distinct prompt once (the G samples of a GRPO group share it), then copy its KV cache
        # and last logits to its rows: a prefix cache in the sense of SGLang's RadixAttention / vLLM.
        first, expand = self._distinct_prompts(chunk, device)
        cache = new_kv_cache(self.policy, int(first.numel()), p_len + m)
        padded = any(len(c[3]) != p_len for c in chunk)  # left padding needs a key mask; else none at all
        mask0 = rows.mask.index_select(0, first)[:, :p_len]
        positions = (mask0.long().cumsum(-1) - 1).clamp_(min=0)
        tape = self._new_tape(chunk, int(first.numel()), p_len, m)
        head: list[torch.Tensor] = []
        rec = None if tape is None else (lambda slot, name, y: head.append(y) if slot < 0 else
                                         tape.write_prefill(slot, name, y))
        logits = self._last_logits(input_ids.index_select(0, first), positions, mask0 if padded else None, cache,
                                   record=rec)
        if tape is not None:
            tape.finish_prefill(expand, torch.tensor([len(c[3]) for c in chunk], device=device), head[0])
        if first.numel() < b0:
            cache.select_(expand)
            logits = logits.index_select(0, expand)
        live = torch.ones(b0, dtype=torch.bool, device=device)
        for t in range(m):
            if pen is not None:
                logits = pen.apply(logits)
            tok, lp = sample_next(logits, temperature=rows.temperature, top_p=rows.top_p, top_k=rows.top_k,
                                  uniform=counter_uniform(rows.keys, t), need_truncation=any_trunc,
                                  any_greedy=any_greedy, unit_temperature=unit_t,
                                  min_p=rows.min_p if any_min_p else None)
            tok = torch.where(live, tok, self.pad_token_id)
            if pen is not None:
                pen.update(tok, live)
            out_tok[rows.out_row, t] = tok
            out_lp[rows.out_row, t] = lp
            out_len[rows.out_row] += live.long()
            if self.on_step is not None:
                self.on_step(chunk, t, out_tok[:, t], out_lp[:, t], out_len)
            hit = (tok.unsqueeze(-1) == rows.stop_ids).any(-1) & live
            stopped[rows.out_row] |= hit
            live = live & ~hit & (t + 1 < rows.max_new)
            n_live = int(live.sum())  # one host sync per step: lets finished rows stop costing compute
            if n_live == 0 or t + 1 == m:
                break
            if n_live <= live.numel() // 2:
                idx = live.nonzero().squeeze(-1)
                rows, tok, live = rows.select(idx), tok.index_select(0, idx), live.index_select(0, idx)
                pen = pen.select(idx) if pen is not None else None
                cache.select_(idx)
            rows.mask[:, p_len + t] = True
            if tape is not None:
                rec = tape.step_writer(rows.out_row, t + 1, all_rows=rows.out_row.numel() == b0)
            logits = self._last_logits(tok.unsqueeze(-1), rows.next_pos.unsqueeze(-1),
                                       rows.mask[:, :p_len + t + 1] if padded else None, cache, record=rec)
            rows.next_pos += 1
        samples = self._to_samples(chunk, out_tok.cpu(), out_lp.cpu(), out_len.cpu(), stopped.cpu())
        if tape is not None:
            serial = self._tape_serial = self._tape_serial + 1
            self._tapes[serial] = tape
            for k, smp in enumerate(samples):
                smp.meta["tape"] = f"{self._tape_tag}:{serial}:{k}"
        return samples

    @staticmethod
    def _distinct_prompts(chunk: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the first occurrence of each distinct prompt [U] and, per row, its index among them [B]."""
        seen: dict[tuple[int, ...], int] = {}
        first, expand = [], []
        for k, c in enumerate(chunk):
            key = tuple(c[3])
            if key not in seen:
                seen[key] = len(first)
                first.append(k)
            expand.append(seen[key])
        return (torch.tensor(first, dtype=torch.long, device=device),
                torch.tensor(expand, dtype=torch.long, device=device))

    @staticmethod
    def _to_samples(chunk: list, tok: torch.Tensor, lp: torch.Tensor, length: torch.Tensor,
                    stopped: torch.Tensor) -> list[Sample]:
        toks, lps, lens, stops = tok.tolist(), lp.tolist(), length.tolist(), stopped.tolist()
        out = []
        for k, c in enumerate(chunk):
            n = lens[k]
            ids = toks[k][:n]
            out.append(Sample(prompt_ids=c[3], output_ids=ids, logprobs=lps[k][:n],
                              finish_reason="stop" if stops[k] else "length",
                              matched_stop=ids[-1] if stops[k] else None))
        return out
