"""Rollout-forward reuse: the GEMM outputs an embedded decode computed, replayed in the training forward.

With the embedded engine the rollout decodes on the training policy's own weights. When the update runs on
those same weights (one update per rollout, the usual on-policy GRPO step), the decode has already computed,
for every token it fed through the model, the output of every decoder linear and of the LM head: exactly the
values the training forward would compute again (up to GEMM summation order). `ActivationTape` keeps them;
`replaying` makes a training forward read them instead of multiplying:

    y = x W^T + b   ->   forward: y = tape[token]      backward: dx = dy W,  dW = dy^T x,  db = sum dy

Everything between the linears (norms, RoPE, attention, SwiGLU, residuals) is recomputed as usual, so the
autograd graph, the backward and the gradient are those of a plain forward; a third of the update's FLOPs
(the forward GEMMs) are gone. Safety: a tape carries the parameters' (data_ptr, version) stamp from the
decode; `ReplaySource.indices` refuses a stale tape (any optimizer step or weight load moves a version), and a
token the decode never fed (a sample's last token: no target, attended by nobody) reads a zero row, which
cannot reach the loss.

Layout of one tape (one decode batch of B rows, U distinct prompts left-padded to P, m new tokens):
for each local decoder layer `slot` and linear name (qkv, proj, gate_up, down) a buffer [U*P + B*m + 1, N]:
rows [0, U*P) are the prefill of the distinct prompts ([u, i] = prompt u's padded position i), row U*P + k*m + j
is decode row k's token at sequence position prompt_len - 1 + j (j = 0: the last prompt token, from the
prefill; j >= 1: the (j-1)-th generated token, from decode step j), the last row is zero. `logits`
[B*m + 1, Vl] holds the head output that predicts generated token j of row k (row k*m + j). Values are this
rank's TP shard (column-parallel outputs) or the full, all-reduced output (row-parallel), as the training
forward produces them.

Tensor parallel: column-parallel replays keep megatron's input-gradient all-reduce on tp_group (through
`copy_to_tensor_model_parallel_region`); row-parallel outputs are recorded after their all-reduce, so their
replay needs no collective. Pipeline parallel: not supported (the embedded engine needs PP = 1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from megaent.ops import gemm

_COLUMN = {"qkv": True, "proj": False, "gate_up": True, "down": False}


def param_stamp(module: torch.nn.Module) -> tuple:
    """(data_ptr, version) of every parameter: changes after any in-place update or replacement."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


def records_attention(policy: Any) -> bool:
    """Whether tapes of `policy` also hold each layer's attention output and log-sum-exp (fp32 CPU policies:
    the training backward then runs the CPU flash kernel's backward on them, see `replaying`)."""
    return policy.dtype == torch.float32 and policy.state.device.type == "cpu"


def _widths(policy: Any) -> list[dict[str, int]]:
    """Per local layer: {buffer name: width} -- the linears' outputs (a column shard's output is its weight's
    rows, a row-parallel output is full) and, with `records_attention`, the attention output [Nl * D] (the
    input of the o-projection) and its log-sum-exp [Nl]."""
    out = []
    for layer, lin in zip(policy.layers.values(), _linears(policy)):
        ws = {name: mod.weight.shape[0] for name, mod in lin.items()}
        if records_attention(policy):
            ws["attn"] = layer.attn.n_q * layer.attn.head_dim
            ws["lse"] = layer.attn.n_q
        out.append(ws)
    return out


def _linears(policy: Any) -> list[dict[str, torch.nn.Module]]:
    return [{"qkv": l.attn.qkv, "proj": l.attn.proj, "gate_up": l.mlp.gate_up, "down": l.mlp.down}
            for l in policy.layers.values()]


class TapePool:
    """Free tape storage, reused by the next decode's tapes (one engine's tapes).

    A tape is ~10 kB per token (every decoder linear's output and the logits); allocating it fresh each step
    costs a page fault per 4 kB page on first touch, more than the copies themselves on a fast CPU. Storage
    (flat, so a buffer of another shape can reuse it: prompt lengths change every step) returns here when its
    tape is released (`ActivationTape.release`), never while a tape still reads it. `trim()` drops what the
    last decode did not take again, so the pool never holds more than one step's tapes.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        """(flat storage, [rows, width] view of it): the smallest free storage that fits (at most 2x the need),
        else a new one."""
        need = rows * width
        fits = [k for k, f in enumerate(self._free)
                if f.dtype == dtype and f.device == device and need <= f.numel() <= 2 * need]
        if fits:
            flat = self._free.pop(min(fits, key=lambda k: self._free[k].numel()))
        else:
            flat = torch.empty(need, dtype=dtype, device=device)
        return flat, flat[:need].view(rows, width)

    def give(self, flat: torch.Tensor) -> None:
        self._free.append(flat)

    def trim(self) -> None:
        self._free.clear()

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self._free)


class ActivationTape:
    """Recorded linear outputs of one decode batch (see the module docstring for the layout).

    The buffers are allocated (or taken from `pool`) when the tape is made; the prefill and every decode step
    copy their outputs straight into them (one strided copy per linear and step, of data still in cache), so a
    replay reads them as they are. `release()` hands them back to the pool and invalidates the tape.
    """

    def __init__(self, policy: Any, *, n_prompts: int, prompt_pad_len: int, n_rows: int, max_new: int,
                 stamp: tuple, pool: Optional[TapePool] = None) -> None:
        self.u, self.p, self.b, self.m = n_prompts, prompt_pad_len, n_rows, max_new
        self.base = n_prompts * prompt_pad_len
        self.stamp: Optional[tuple] = stamp
        self._dtype, self._device = policy.dtype, policy.state.device
        self._pool = pool if pool is not None else TapePool()
        widths = _widths(policy)
        self.has_attention = records_attention(policy)
        vl = policy.padded_vocab_size // policy.state.tp
        self._storage: list[torch.Tensor] = []

        def take(rows: int, width: int) -> torch.Tensor:
            flat, buf = self._pool.take(rows, width, self._dtype, self._device)
            self._storage.append(flat)
            return buf

        self._act: list[dict[str, torch.Tensor]] = [
            {name: take(self.base + n_rows * max_new + 1, w) for name, w in ws.items()} for ws in widths]
        self._logits = take(n_rows * max_new + 1, vl)
        for buf in self._buffers():
            buf[-1].zero_()  # the row of tokens the decode never fed
        for bufs in self._act:
            if "lse" in bufs:  # an unfed token's attention weights exp(s - lse) are 0, never inf (see layers.py)
                bufs["lse"][-1].fill_(float("inf"))
        # [B, m, N] decode views per (slot, name) (the head: slot -1), and the current step's pending copies.
        self._dec = {(slot, name): self._decode_part(buf, self.base)
                     for slot, bufs in enumerate(self._act) for name, buf in bufs.items()}
        self._dec[(-1, "head")] = self._decode_part(self._logits, 0)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.expand: Optional[torch.Tensor] = None  # [B] prompt row of each decode row
        self.prompt_lens: Optional[torch.Tensor] = None  # [B]
        self.fed: Optional[torch.Tensor] = None  # [B] decode slots j < fed[k] hold data
        self._next_slot = 1

    @staticmethod
    def nbytes_for(policy: Any, *, n_prompts: int, prompt_pad_len: int, n_rows: int, max_new: int) -> int:
        """Bytes a tape of this shape would take (to check a memory cap before recording)."""
        width = sum(w for ws in _widths(policy) for w in ws.values())
        vl = policy.padded_vocab_size // policy.state.tp
        elem = torch.empty(0, dtype=policy.dtype).element_size()
        return elem * ((n_prompts * prompt_pad_len + n_rows * max_new + 1) * width + (n_rows * max_new + 1) * vl)

    def _buffers(self) -> Iterator[torch.Tensor]:
        for bufs in self._act:
            yield from bufs.values()
        yield self._logits

    def _decode_part(self, buf: torch.Tensor, n_pre: int) -> torch.Tensor:
        """[B, m, N] view of the decode rows of one buffer (row k, slot j at n_pre + k*m + j)."""
        return buf[n_pre:n_pre + self.b * self.m].view(self.b, self.m, buf.shape[-1])

    # ---- recording (DecodeRunner / EmbeddedEngine) -------------------------------------------------------------
    def write_prefill(self, slot: int, name: str, y: torch.Tensor) -> None:
        """y [U, P, N]: the prefill's output of linear `name` of local layer `slot`."""
        self._act[slot][name][:self.base].copy_(y.reshape(self.base, y.shape[-1]))

    def finish_prefill(self, expand: torch.Tensor, prompt_lens: torch.Tensor, logits: torch.Tensor) -> None:
        """Rows' prompts (expand [B] -> prefill row), prompt lengths [B], the prefill's last logits [U, Vl].
        Decode slot 0 of every row (its last prompt token) is the prefill's last position of its prompt."""
        self.expand, self.prompt_lens = expand, prompt_lens
        self.fed = torch.ones(self.b, dtype=torch.long, device=expand.device)
        for slot, bufs in enumerate(self._act):
            for name, buf in bufs.items():
                last = buf[:self.base].view(self.u, self.p, buf.shape[-1])[:, -1]
                self._dec[(slot, name)][:, 0].copy_(last.index_select(0, expand))
        self._dec[(-1, "head")][:, 0].copy_(logits.index_select(0, expand))

    def step_writer(self, out_rows: torch.Tensor, j: int, *, all_rows: bool):
        """record(slot, name, y) for decode slot j (j = 1, 2, ... in order) of decode rows out_rows [b] (marks them
        fed); y [b, 1, N] of a linear or [b, Vl] of the head (slot -1). `all_rows`: out_rows is arange(B) (no row
        compacted away yet). A step's copies are issued together (one `_foreach_copy_`) when the next step
        starts or a replay first reads the tape."""
        assert j == self._next_slot, "decode slots are recorded in order"
        self._flush()
        self._next_slot += 1
        self.fed[out_rows] = j + 1
        dec, pending = self._dec, self._pending

        def record(slot: int, name: str, y: torch.Tensor) -> None:
            dst = dec[(slot, name)][:, j]
            y = y.reshape(y.shape[0], -1)
            if all_rows:
                pending.append((dst, y))
            else:  # some rows were compacted away: their slots are never read (fed), the live ones are placed
                dst.index_copy_(0, out_rows, y)

        return record

    def _flush(self) -> None:
        if self._pending:
            dsts, srcs = zip(*self._pending)
            torch._foreach_copy_(list(dsts), list(srcs))
            self._pending.clear()

    def release(self) -> None:
        """Hand the buffers back to the pool; the tape is refused by every later replay."""
        if self.stamp is None:
            return
        self.stamp = None
        self._pending.clear()
        self._dec = {}
        for flat in self._storage:
            self._pool.give(flat)
        self._storage, self._act, self._logits = [], [], torch.empty(0)

    @property
    def act(self) -> list[dict[str, torch.Tensor]]:
        """Per local layer: {linear name: [U*P + B*m + 1, N]}."""
        if self.stamp is None:
            raise RuntimeError("this ActivationTape was released; its buffers belong to a newer tape")
        self._flush()
        return self._act

    @property
    def logits(self) -> torch.Tensor:
        """[B*m + 1, Vl] head outputs."""
        if self.stamp is None:
            raise RuntimeError("this ActivationTape was released; its buffers belong to a newer tape")
        self._flush()
        return self._logits

    # ---- replay (trainer) --------------------------------------------------------------------------------------
    def token_rows(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer indices of tokens: decode row [T] and position in its sample's full sequence [T] ->
        (activation rows [T], logit rows [T]); unrecorded tokens point at the zero row."""
        p = self.prompt_lens[rows]
        j = positions - (p - 1)
        in_prompt = j < 0
        fed = (j >= 0) & (j < self.fed[rows])
        prompt_idx = self.expand[rows] * self.p + (self.p - p) + positions
        dec_idx = self.base + rows * self.m + j
        zero_act, zero_logit = self.base + self.b * self.m, self.b * self.m
        act = torch.where(in_prompt, prompt_idx, torch.where(fed, dec_idx, torch.full_like(dec_idx, zero_act)))
        logit = torch.where(fed, rows * self.m + j, torch.full_like(dec_idx, zero_logit))
        return act, logit


@dataclass
class ReplaySource:
    """Tapes of this step's rollout and where each training sample's tokens live in them.

    rows: {sample uid: (tape, decode row)}. `indices(mb)` -> (tape, activation rows [S], logit rows [S]) for a
    micro-batch whose tokens all come from one valid tape, else None (the forward then runs normally).
    """

    policy: Any
    rows: dict[int, tuple[ActivationTape, int]] = field(default_factory=dict)
    _cache: dict[int, Any] = field(default_factory=dict)

    def indices(self, mb: Any) -> Optional[tuple[ActivationTape, torch.Tensor, torch.Tensor]]:
        from megaent.trainer.batching import UID_STRIDE

        key = id(mb)
        if key in self._cache:
            hit = self._cache[key]
            out = hit[1]
        else:
            out = None
            if not mb.is_empty and all(u in self.rows for u in mb.uids):
                tapes = {id(self.rows[u][0]) for u in mb.uids}
                if len(tapes) == 1:
                    tape = self.rows[mb.uids[0]][0]
                    tok = mb.token_uid.reshape(-1)
                    uid, pos = tok // UID_STRIDE, tok % UID_STRIDE
                    lut = torch.full((int(uid.max()) + 1,), -1, dtype=torch.long)
                    for u in set(uid.tolist()):
                        if u in self.rows:
                            lut[u] = self.rows[u][1]
                    rows = lut[uid]
                    if bool((rows >= 0).all()):
                        dev = tape._device
                        act, logit = tape.token_rows(rows.to(dev), pos.to(dev))
                        out = (tape, act, logit)
            self._cache[key] = (mb, out)  # keeps mb alive so its id is not reused within the step
        if out is None or out[0].stamp is None or out[0].stamp != param_stamp(self.policy):
            return None
        return out


class _Replay(torch.autograd.Function):
    """y = x W^T + b with y read from the tape: forward gathers rows, backward is the linear's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], buf: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return buf.index_select(0, idx).view(*x.shape[:-1], buf.shape[-1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        return (*gemm.linear_backward(g, x, w, ctx.needs_input_grad, ctx.has_bias), None, None)


def _column_forward(mod: Any, buf: torch.Tensor, idx: torch.Tensor):
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    def forward(input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output=None):
        if runtime_gather_output or mod.gather_output:
            raise RuntimeError("replay of a column-parallel linear with gather_output is not supported")
        w = mod.weight if weight is None else weight
        x = copy_to_tensor_model_parallel_region(input_, group=mod.tp_group)  # identity; dgrad all-reduce
        bias = None if mod.skip_bias_add else mod.bias
        return _Replay.apply(x, w, bias, buf, idx), (mod.bias if mod.skip_bias_add else None)

    return forward


def _row_forward(mod: Any, buf: torch.Tensor, idx: torch.Tensor):
    def forward(input_: torch.Tensor):
        bias = None if mod.skip_bias_add else mod.bias
        return _Replay.apply(input_, mod.weight, bias, buf, idx), (mod.bias if mod.skip_bias_add else None)

    return forward


@contextlib.contextmanager
def replaying(policy: Any, tape: ActivationTape, act_idx: torch.Tensor, logit_idx: torch.Tensor) -> Iterator[None]:
    """Within the block, every decoder linear (and the LM head) of `policy` reads its output from `tape` at
    the given rows ([S] each: one micro-batch row [1, S]). Backward as a plain linear. No collectives besides
    the column-parallel input-gradient all-reduce on tp_group that the plain layer also does.

    With `tape.has_attention`, each layer's core attention also comes from the tape
    (`SelfAttention.replay_attention`): its output is read, and its backward is the CPU flash kernel's
    backward on the recomputed q, k, v and the recorded output and log-sum-exp."""
    patched, attn = [], []
    try:
        for slot, (layer, lin) in enumerate(zip(policy.layers.values(), _linears(policy))):
            for name, mod in lin.items():
                fwd = (_column_forward if _COLUMN[name] else _row_forward)(mod, tape.act[slot][name], act_idx)
                mod.forward = fwd
                patched.append(mod)
            if tape.has_attention:
                layer.attn.replay_attention = (tape.act[slot]["attn"], tape.act[slot]["lse"], act_idx)
                attn.append(layer.attn)
        if policy.state.is_last_stage:
            policy.head.forward = _column_forward(policy.head, tape.logits, logit_idx)
            patched.append(policy.head)
        yield
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
        for mod in attn:
            mod.replay_attention = None
