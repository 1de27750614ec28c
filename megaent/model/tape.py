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

_COLUMN = {"qkv": True, "proj": False, "gate_up": True, "down": False}


def param_stamp(module: torch.nn.Module) -> tuple:
    """(data_ptr, version) of every parameter: changes after any in-place update or replacement."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


def _linears(policy: Any) -> list[dict[str, torch.nn.Module]]:
    return [{"qkv": l.attn.qkv, "proj": l.attn.proj, "gate_up": l.mlp.gate_up, "down": l.mlp.down}
            for l in policy.layers.values()]


class ActivationTape:
    """Recorded linear outputs of one decode batch (see the module docstring for the layout).

    Recording keeps references to the runner's output tensors (no copy per decode step: ~1000 small copies
    per rollout on the bench); `act` / `logits` assemble the buffers once, on first use by a replay, with one
    stack per linear, and drop the references.
    """

    def __init__(self, policy: Any, *, n_prompts: int, prompt_pad_len: int, n_rows: int, max_new: int,
                 stamp: tuple) -> None:
        self.u, self.p, self.b, self.m = n_prompts, prompt_pad_len, n_rows, max_new
        self.base = n_prompts * prompt_pad_len
        self.stamp = stamp
        self._dtype, self._device = policy.dtype, policy.state.device
        self._widths = [{name: mod.weight.shape[0] for name, mod in lin.items()} for lin in _linears(policy)]
        self._vl = policy.padded_vocab_size // policy.state.tp
        # [out, in] weights: a column shard's output is its rows, a row-parallel output is full.
        self._prefill: dict[tuple[int, str], torch.Tensor] = {}  # (slot, name) -> [U, P, N]
        self._prefill_logits: Optional[torch.Tensor] = None  # [U, Vl]
        self._steps: list[tuple[Optional[torch.Tensor], dict[tuple[int, str], torch.Tensor]]] = []  # slot j >= 1
        self._act: Optional[list[dict[str, torch.Tensor]]] = None
        self._logits: Optional[torch.Tensor] = None
        self.expand: Optional[torch.Tensor] = None  # [B] prompt row of each decode row
        self.prompt_lens: Optional[torch.Tensor] = None  # [B]
        self.fed: Optional[torch.Tensor] = None  # [B] decode slots j < fed[k] hold data

    @staticmethod
    def nbytes_for(policy: Any, *, n_prompts: int, prompt_pad_len: int, n_rows: int, max_new: int) -> int:
        """Bytes a tape of this shape would take (to check a memory cap before recording)."""
        width = sum(m.weight.shape[0] for lin in _linears(policy) for m in lin.values())
        vl = policy.padded_vocab_size // policy.state.tp
        elem = torch.empty(0, dtype=policy.dtype).element_size()
        return elem * ((n_prompts * prompt_pad_len + n_rows * max_new + 1) * width + (n_rows * max_new + 1) * vl)

    # ---- recording (DecodeRunner / EmbeddedEngine) -------------------------------------------------------------
    def write_prefill(self, slot: int, name: str, y: torch.Tensor) -> None:
        """y [U, P, N]: the prefill's output of linear `name` of local layer `slot` (kept by reference)."""
        self._prefill[(slot, name)] = y

    def finish_prefill(self, expand: torch.Tensor, prompt_lens: torch.Tensor, logits: torch.Tensor) -> None:
        """Rows' prompts (expand [B] -> prefill row), prompt lengths [B], the prefill's last logits [U, Vl]."""
        self.expand, self.prompt_lens = expand, prompt_lens
        self.fed = torch.ones(self.b, dtype=torch.long, device=expand.device)
        self._prefill_logits = logits

    def step_writer(self, out_rows: torch.Tensor, j: int, *, all_rows: bool):
        """record(slot, name, y) for decode slot j (j = 1, 2, ... in order) of decode rows out_rows [b] (marks them
        fed); y [b, 1, N] of a linear or [b, Vl] of the head (slot -1), kept by reference. `all_rows`: out_rows
        is arange(B) (no row compacted away yet)."""
        assert j == len(self._steps) + 1, "decode slots are recorded in order"
        self.fed[out_rows] = j + 1
        outs: dict[tuple[int, str], torch.Tensor] = {}
        self._steps.append((None if all_rows else out_rows, outs))

        def record(slot: int, name: str, y: torch.Tensor) -> None:
            outs[(slot, name)] = y.reshape(y.shape[0], -1)

        return record

    # ---- assembly ----------------------------------------------------------------------------------------------
    def _assemble(self, prefill_last: torch.Tensor, key: tuple[int, str], width: int, head: Optional[torch.Tensor]
                  ) -> torch.Tensor:
        """[B*m + 1, N] decode part (plus the prefill rows in front when `head` is given) of one buffer."""
        n_pre = 0 if head is None else self.base
        buf = torch.empty(n_pre + self.b * self.m + 1, width, dtype=self._dtype, device=self._device)
        if head is not None:
            buf[:n_pre] = head.reshape(n_pre, width)
        buf[-1].zero_()
        cols = [prefill_last.index_select(0, self.expand)]
        for rows, outs in self._steps:
            y = outs[key]
            if rows is not None:  # some rows were compacted away: place the live ones, zeros elsewhere
                y = y.new_zeros(self.b, width).index_copy_(0, rows, y)
            cols.append(y)
        dec = buf[n_pre:n_pre + self.b * self.m].view(self.b, self.m, width)
        if len(cols) == self.m:
            torch.stack(cols, dim=1, out=dec)  # one copy of every decode slot
        else:  # the decode ended before max_new tokens for every row: the slots after it stay zero
            dec[:, len(cols):].zero_()
            dec[:, :len(cols)].copy_(torch.stack(cols, dim=1))
        return buf

    def _materialize(self) -> None:
        if self._act is not None:
            return
        act = []
        for slot, widths in enumerate(self._widths):
            bufs = {}
            for name, width in widths.items():
                pre = self._prefill[(slot, name)]
                bufs[name] = self._assemble(pre[:, -1].reshape(self.u, width), (slot, name), width, pre)
            act.append(bufs)
        self._logits = self._assemble(self._prefill_logits, (-1, "head"), self._vl, None)
        self._act = act
        self._prefill, self._steps, self._prefill_logits = {}, [], None  # the buffers hold everything now

    @property
    def act(self) -> list[dict[str, torch.Tensor]]:
        """Per local layer: {linear name: [U*P + B*m + 1, N]} (assembled on first use)."""
        self._materialize()
        return self._act

    @property
    def logits(self) -> torch.Tensor:
        """[B*m + 1, Vl] head outputs (assembled on first use)."""
        self._materialize()
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
        if out is None or out[0].stamp != param_stamp(self.policy):
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
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ w).view_as(x) if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


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
    the column-parallel input-gradient all-reduce on tp_group that the plain layer also does."""
    patched = []
    try:
        for slot, lin in enumerate(_linears(policy)):
            for name, mod in lin.items():
                fwd = (_column_forward if _COLUMN[name] else _row_forward)(mod, tape.act[slot][name], act_idx)
                mod.forward = fwd
                patched.append(mod)
        if policy.state.is_last_stage:
            policy.head.forward = _column_forward(policy.head, tape.logits, logit_idx)
            patched.append(policy.head)
        yield
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
