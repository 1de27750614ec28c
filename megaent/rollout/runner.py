"""`DecodeRunner`: the inference forward of a `Policy` for the embedded engine.

The training forward goes through megatron-core's autograd Functions (copy-to /
reduce-from region, `LinearWithGradAccumulationAndAsyncCommunication`) and builds
a full attention mask every call. Decoding runs ~100 tiny forwards per sample
(M = batch rows, one token each), where that bookkeeping and the GEMM kernel
choice, not the FLOPs, decide the speed. So rollout runs its own forward over
the *same* parameter tensors, as SGLang and vLLM run their own model code:

- plain `F.linear` (or a prepacked oneDNN GEMM, below) plus an explicit
  `all_reduce` on `tp_group` after the row-parallel projections and the
  vocab-parallel embedding, exactly the collectives of the training forward;
- RoPE applied once to the query and key heads together; no attention mask
  when no row is left-padded (a decode query attends to every cached key);
- the final norm and LM head on the last position only; fp32 RMSNorm as torch's fused `rms_norm`.

Prepacked weights (CPU, fp32): oneDNN's `_reorder_linear_weight` /
`_linear_pointwise` pair (what TorchInductor's CPU weight prepacking uses)
stores each weight in the blocked layout its GEMM wants; on an AVX2 core it
runs the decode GEMMs (M = 16) ~1.3x faster than `F.linear` (MKL) on the same
weights, to fp32 rounding. The packed copies are rebuilt whenever the policy's
parameters change (their version counters move after every optimizer step or
weight load; checked when a sequence starts), so the runner always decodes the
current policy.

Numerics equal the training forward up to GEMM summation order (the engine's
tests check sampled log-probs against the trainer's to 1e-5 and greedy output
against `transformers`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaent.model.layers import build_attention_mask
from megaent.model.rope import apply_rope, rope_cos_sin
from megaent.ops.gemm import onednn_prepack_available, packed_linear, prepack as prepack_weight


class _Linear:
    """y = x W^T (+ b) for one weight [N, K], through a prepacked oneDNN weight when `packed` is set."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], *, prepack: bool, rows_hint: int):
        self.weight, self.bias = weight, bias
        self.packed = prepack_weight(weight, rows_hint) if prepack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)


class DecodeRunner:
    """Inference forward of `policy` (PP = 1, local backend) for prefill and decode steps. No autograd.

    `prepack=None` picks prepacked oneDNN GEMMs on CPU for fp32 policies when the torch build has them.
    """

    def __init__(self, policy: Any, *, prepack: Optional[bool] = None, rows_hint: int = 16):
        self.policy = policy
        st = policy.state
        self.group = st.tp_group if st.tp > 1 else None
        auto = st.device.type == "cpu" and policy.dtype == torch.float32 and onednn_prepack_available()
        self.prepack = auto if prepack is None else bool(prepack)
        if self.prepack and not onednn_prepack_available():
            raise RuntimeError("DecodeRunner(prepack=True) needs a torch build with oneDNN (MKLDNN); pass "
                               "prepack=False")
        self.rows_hint = rows_hint
        arch = policy.arch
        self.d = arch.head_dim
        self.n_q, self.n_kv = arch.num_attention_heads // st.tp, arch.num_key_value_heads // st.tp
        self.scale = 1.0 / math.sqrt(self.d)
        # fp32: torch's fused rms_norm is the model's RMSNorm math in one kernel; other dtypes keep the module
        # (it normalises in fp32 and casts back before the weight, as HF does).
        self._fused_norm = policy.dtype == torch.float32
        from megaent.model.tape import records_attention

        self._records_attention = records_attention(policy)  # record() also gets ("attn", [B, S, Nl*D]), ("lse", ..)
        self._stamp: Optional[tuple] = None
        self._layers: list[tuple[Any, _Linear, _Linear, _Linear, _Linear]] = []
        self._head: Optional[_Linear] = None

    @staticmethod
    def supports(policy: Any) -> bool:
        """True for a single-stage policy whose decoder linears are megatron-core's local TP layers (the
        layout this runner reads); Transformer Engine layers keep the policy's own forward."""
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        if getattr(policy.state, "pp", 1) != 1 or len(policy.layers) == 0:
            return False
        for layer in policy.layers.values():
            a, m = getattr(layer, "attn", None), getattr(layer, "mlp", None)
            if not (isinstance(getattr(a, "qkv", None), ColumnParallelLinear)
                    and isinstance(getattr(a, "proj", None), RowParallelLinear)
                    and isinstance(getattr(m, "gate_up", None), ColumnParallelLinear)
                    and isinstance(getattr(m, "down", None), RowParallelLinear)):
                return False
        return True

    # ---- weights -----------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """(Re)build the per-layer linears when any parameter was replaced or changed in place."""
        params = list(self.policy.parameters())
        stamp = tuple((p.data_ptr(), p._version) for p in params)
        if stamp == self._stamp:
            return
        kw = dict(prepack=self.prepack, rows_hint=self.rows_hint)
        self._layers = []
        for layer in self.policy.layers.values():
            a, m = layer.attn, layer.mlp
            self._layers.append((layer, _Linear(a.qkv.weight, a.qkv.bias, **kw), _Linear(a.proj.weight, None, **kw),
                                 _Linear(m.gate_up.weight, None, **kw), _Linear(m.down.weight, None, **kw)))
        self._head = _Linear(self.policy.head_weight, None, **kw)
        self._stamp = stamp

    # ---- forward -----------------------------------------------------------------------------------------------
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.policy.embed.weight
        if self.group is None:
            return F.embedding(ids, w)
        lo, hi = self.policy.vocab_range
        outside = (ids < lo) | (ids >= hi)
        x = F.embedding((ids - lo).masked_fill(outside, 0), w).masked_fill(outside.unsqueeze(-1), 0.0)
        return self._reduce(x)

    def _norm(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        if self._fused_norm:
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
        return norm(x)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, want_lse: bool = False
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One query per row, every cached key real: q [B, Nl, 1, D], k/v [B, KVl, S, D] -> ([B, Nl, 1, D],
        log-sum-exp of the scaled scores [B, Nl, 1] when `want_lse`, else None).

        The Nl / KVl query heads sharing a KV head are one [g, D] x [D, S] matmul (no K/V repeat), softmax in
        fp32 (fp32 policies only); ~1.4x faster than the flash kernel at this size, same values to rounding."""
        b, nq, _, d = q.shape
        nkv = k.shape[1]
        scores = torch.matmul(q.reshape(b, nkv, nq // nkv, d), k.transpose(-1, -2)).mul_(self.scale)
        if not want_lse:
            return torch.matmul(torch.softmax(scores, dim=-1), v).view(b, nq, 1, d), None
        # softmax by hand, normalised after the PV product ([g, D] rows, not [g, S]), log-sum-exp on the way
        top = scores.amax(dim=-1, keepdim=True)
        e = scores.sub_(top).exp_()
        total = e.sum(dim=-1, keepdim=True)
        out = torch.matmul(e, v).div_(total).view(b, nq, 1, d)
        return out, total.log_().add_(top).view(b, nq, 1)

    def _attention_with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """SDPA through the CPU flash kernel, which also returns the log-sum-exp [B, Nl, S] (recorded for the
        training backward); a boolean mask becomes the additive float mask that kernel takes."""
        am = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=am,
                                                                              scale=self.scale)
        return out, lse

    @torch.no_grad()
    def last_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *, key_mask: Optional[torch.Tensor],
                    cache: Any, record: Optional[Callable[[int, str, torch.Tensor], None]] = None) -> torch.Tensor:
        """Forward new tokens input_ids [B, S] at position_ids [B, S] into `cache` (written at [length, length+S),
        then advanced); key_mask [B, length + S] bool (True = real token) or None when no row is padded.
        Returns the vocab-sharded logits of the last position [B, Vl] (padding = finfo.min).
        Weights are (re)read at the start of each sequence (a prefill into an empty cache): a KV cache filled
        by other weights could not be continued anyway, so decode steps skip the check.
        record(slot, name, y): called with every decoder linear's output y [B, S, N] (name in qkv, proj, gate_up,
        down; row-parallel outputs after their all-reduce), for `megaent.model.tape.ActivationTape`; with
        `records_attention` (fp32 CPU) also the attention output ("attn", [B, S, Nl*D], the o-projection's input)
        and its log-sum-exp ("lse", [B, S, Nl]).
        Collectives on tp_group: 1 all-reduce for the embedding + 2 per layer."""
        if cache.length == 0 or self._stamp is None:
            self._refresh()
        pol = self.policy
        b, s = input_ids.shape
        x = self._embed(input_ids)
        cos, sin = rope_cos_sin(pol.inv_freq, position_ids, x.dtype)
        cache_len = cache.length
        if key_mask is None and s == 1:
            mask, causal = None, False  # one new query per row, every cached key is real
        elif key_mask is None and cache_len == 0:
            mask, causal = None, True
        else:
            mask = build_attention_mask(q_len=s, cache_len=cache_len, key_mask=key_mask, segment_ids=None, batch=b,
                                        device=x.device)
            causal = False
        d, nq, nkv = self.d, self.n_q, self.n_kv
        rec_attn = record is not None and self._records_attention
        lse = None
        for slot, (layer, qkv_l, proj_l, gate_up_l, down_l) in enumerate(self._layers):
            qkv = qkv_l(self._norm(layer.input_norm, x))
            qk = apply_rope(qkv[..., :(nq + nkv) * d].view(b, s, nq + nkv, d).transpose(1, 2), cos, sin)
            v = qkv[..., (nq + nkv) * d:].view(b, s, nkv, d).transpose(1, 2)
            k, v = cache.update(slot, qk[:, nq:], v)
            if s == 1 and mask is None and self._fused_norm:
                out, lse = self._decode_attention(qk[:, :nq], k, v, want_lse=rec_attn)
            elif rec_attn:
                out, lse = self._attention_with_lse(qk[:, :nq], k, v, mask, causal)
            else:
                out = F.scaled_dot_product_attention(qk[:, :nq], k, v, attn_mask=mask, is_causal=causal,
                                                     scale=self.scale, enable_gqa=nq != nkv)
            attn = out.transpose(1, 2).reshape(b, s, nq * d)
            o = self._reduce(proj_l(attn))
            x = x + o
            gate_up = gate_up_l(self._norm(layer.post_norm, x))
            gate, up = gate_up.chunk(2, dim=-1)
            down = self._reduce(down_l(F.silu(gate) * up))
            x = x + down
            if record is not None:
                for name, y in (("qkv", qkv), ("proj", o), ("gate_up", gate_up), ("down", down)):
                    record(slot, name, y)
                if rec_attn:
                    record(slot, "attn", attn)
                    record(slot, "lse", lse.transpose(1, 2))  # [B, S, Nl]
        cache.advance(s)
        return pol.mask_padded_vocab(self._head(self._norm(pol.final_norm, x[:, -1])))
