"""One decoder layer (the families of `megaent.model.arch`) on megatron-core tensor-parallel linears.

Pre-norm residual block: x + Attn(RMSNorm(x)), then h + MLP(RMSNorm(h)); the MLP is a SwiGLU, or for the MoE
families the routed experts of `megaent.model.sparse_moe` (TP-split the same way, also one all-reduce).
TP split (Megatron-LM, Shoeybi et al. 2019): the fused QKV and gate/up
projections are column-parallel (each rank owns whole heads / a slice of the
MLP width), the output and down projections are row-parallel and end in one
all-reduce on `tp_group` each. So a layer costs 2 all-reduces on tp_group in
forward and 2 in backward (inside the megatron layers). Every megatron layer
receives `tp_group=` explicitly; nothing here reads megatron's global state.

Local layouts of the fused weights (rows of this rank's shard):
- `attn.qkv`: [q heads of this rank | k heads | v heads]  (Nl*D + 2*KVl*D rows)
- `mlp.gate_up`: [gate slice | up slice]                  (2 * I/TP rows)
`megaent.model.hf_names` builds exactly these layouts from HF tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch.utils.checkpoint import checkpoint

from megaent.model.arch import ModelArch
from megaent.model.cache import KVCache
from megaent.model.fused import rms_norm_fp32, swiglu
from megaent.model.rope import apply_rope
from megaent.model.sparse_moe import SparseMoE
from megaent.ops import gemm


def _no_init(_: torch.Tensor) -> None:
    """Weights are filled by `megaent.model.policy` (from a checkpoint or a seeded generator)."""


class _CpuLinear(torch.autograd.Function):
    """y = x w^T (+ b) on the prepacked oneDNN GEMMs of `megaent.ops.gemm` (fp32 CPU), with the plain linear's
    backward: dx = g w, dW = g^T x, db = g summed over all leading dims. No collectives (the callers keep
    megatron's). Saves x only when dW is wanted and w only when dx is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.has_bias = bias is not None
        return gemm.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        return gemm.linear_backward(g, x, w, ctx.needs_input_grad, ctx.has_bias)


def _fast_linear_ok(mod: torch.nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Whether a megatron TP linear's forward may run on `_CpuLinear` with megatron's exact semantics: eager (not
    under torch.compile, which traces megatron's own forward), fp32 CPU input / weight / bias on gemm's oneDNN
    path, no CPU autocast, and none of the megatron features that change the GEMM or its communication
    (sequence parallel, gradient-accumulation fusion, expert comm, CPU offloading, an instance-level
    `_forward_impl` such as `megaent.model.fp8`'s). Empty inputs stay on megatron's path (oneDNN refuses M = 0)."""
    if torch.compiler.is_compiling():
        return False
    if weight is None or not gemm.uses_onednn(weight) or weight.numel() == 0:
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0:
        return False
    bias = mod.bias
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if mod.sequence_parallel or mod.gradient_accumulation_fusion or mod.explicit_expert_comm:
        return False
    if "_forward_impl" in mod.__dict__ or mod.config._cpu_offloading_context is not None:
        return False
    return True


class _ColumnParallelLinear(ColumnParallelLinear):
    """megatron-core `ColumnParallelLinear` whose fp32 CPU forward/backward GEMMs run on `_CpuLinear` (oneDNN,
    prepacked weight) instead of MKL's matmul. Semantics and collectives are megatron's: the input passes
    `copy_to_tensor_model_parallel_region` (identity forward, all-reduce of dx over tp_group in backward: what
    megatron's `allreduce_dgrad` does; nothing at TP = 1), the bias is added unless skip_bias_add (then
    returned), `weight=` replaces the layer's weight (tied LM head), returns (output shard, bias or None).
    Anything the fast path does not cover (see `_fast_linear_ok`; gather_output / runtime_gather_output,
    disable_grad_reduce, deferred embedding wgrad) runs megatron's forward unchanged."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        w = self.weight if weight is None else weight
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if (gather or self.disable_grad_reduce or self.config.defer_embedding_wgrad_compute
                or not _fast_linear_ok(self, input_, w)
                or tuple(w.shape) != (self.output_size_per_partition, self.input_size)):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        bias = None if self.skip_bias_add else self.bias
        if bias is not None and not w.requires_grad:
            bias = bias.detach()  # megatron's frozen-weight linear (LinearWithFrozenWeight) gives bias no gradient
        x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return _CpuLinear.apply(x, w, bias), (self.bias if self.skip_bias_add else None)


class _RowParallelLinear(RowParallelLinear):
    """megatron-core `RowParallelLinear` whose fp32 CPU forward/backward GEMMs run on `_CpuLinear` (see
    `_ColumnParallelLinear`). Fast path (input_is_parallel, see `_fast_linear_ok`): y_partial = x w^T without
    bias, `reduce_from_tensor_model_parallel_region` (all-reduce forward over tp_group, identity backward), then
    + bias, or the bias returned with skip_bias_add -- megatron's forward step for step; else megatron's forward.

    megatron-core 0.16 `RowParallelLinear.forward` passes `tp_group=None` to its matmul function, which then
    asks the global `parallel_state` for a group (unused there: no dgrad all-reduce). `_forward_impl` passes
    ours instead, so the layer works without megatron's globals (tests/test_model_parity.py makes the getters
    raise)."""

    def _forward_impl(self, input, weight, *args, **kwargs):  # noqa: A002 (megatron's parameter name)
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)

    def forward(self, input_: torch.Tensor):
        if not self.input_is_parallel or not _fast_linear_ok(self, input_, self.weight):
            return super().forward(input_)
        out = reduce_from_tensor_model_parallel_region(_CpuLinear.apply(input_, self.weight, None),
                                                       group=self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None


def tp_layer_config(dtype: torch.dtype) -> ModelParallelConfig:
    """megatron-core layer options: CPU allocation, no megatron init, no sequence parallel / fusion."""
    return ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype,
                               sequence_parallel=False, gradient_accumulation_fusion=False)


class RMSNorm(torch.nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) computed in fp32, cast back before the weight, as HF Llama/Qwen2 do."""

    def __init__(self, hidden: int, *, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H] in x's dtype."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return rms_norm_fp32(x, self.weight, self.eps)  # the same math, hand-written backward
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass(frozen=True)
class SegmentLayout:
    """Packed rows as a padded batch of segments, for attention that costs sum(L_seg^2), not S^2.

    A packed micro-batch row holds many short samples; a dense [S, S] segment mask makes attention quadratic
    in the row length. Instead each segment is gathered into its own row of a [n_seg, L_max] batch (right
    padded), attended with plain causal SDPA (a valid query never sees the padding after it), and scattered
    back. gather [n_seg * L_max] indexes flattened [B * S] positions (padding points at position 0, ignored);
    scatter [B * S] indexes the flattened padded batch: each position's OWNER slot, in its own segment's row.
    Built once per forward, shared by all layers.

    Shared prefixes (`prefix_ids`, see `megaent.trainer.batching.MicroBatch`): the row of a segment with a
    prefix is [the prefix segment's tokens, its own tokens], so causal SDPA over the row lets each own token
    see the whole prefix and its own past. The prefix segment has no row of its own: the copy in its first
    reader's row owns it. The other copies are `dup_slot` [D], reading positions `dup_pos` [D]: their queries
    are computed and dropped, their keys/values get gradients that are summed into the prefix positions
    (every sample of the group attends to them). n_seg counts padded rows.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    n_seg: int
    max_len: int
    dup_slot: Optional[torch.Tensor] = None
    dup_pos: Optional[torch.Tensor] = None

    @staticmethod
    def from_segment_ids(segment_ids: torch.Tensor, prefix_ids: Optional[torch.Tensor] = None) -> "SegmentLayout":
        """segment_ids [B, S]: a segment is a run of equal ids within a row. prefix_ids [B, S] (optional): on a
        segment's tokens, the id of the segment (same row, id unique in the row) it also attends to, or -1."""
        b, s = segment_ids.shape
        flat = segment_ids.reshape(-1)
        pos = torch.arange(b * s, device=flat.device)
        new = torch.ones(b * s, dtype=torch.bool, device=flat.device)
        new[1:] = (flat[1:] != flat[:-1]) | (pos[1:] % s == 0)
        seg = torch.cumsum(new.to(torch.long), 0) - 1  # [B*S] segment of each position
        starts = pos[new]  # [n_seg]
        lengths = torch.diff(torch.cat([starts, pos.new_tensor([b * s])]))
        plen = torch.zeros_like(lengths)  # [n_seg] prefix tokens in front of each segment's row
        src = None
        if prefix_ids is not None:
            if prefix_ids.shape != segment_ids.shape:
                raise ValueError(f"prefix_ids has shape {tuple(prefix_ids.shape)}; expected segment_ids' "
                                 f"{tuple(segment_ids.shape)}")
            want = prefix_ids.reshape(-1)[starts]  # [n_seg] prefix id of each segment (-1: none)
            row, ids = starts // s, flat[starts]
            hit = (row[:, None] == row[None, :]) & (ids[None, :] == want[:, None])  # [n_seg, n_seg]
            found = hit.any(1)
            if bool(((want >= 0) & ~found).any()):
                bad = want[(want >= 0) & ~found].tolist()
                raise ValueError(f"prefix_ids name segment ids {bad} that have no segment in the same row; "
                                 f"prefix ids must be segment_ids values of an earlier segment of that row")
            src = hit.to(torch.long).argmax(1)  # [n_seg] the prefix segment (first match)
            plen = torch.where(want >= 0, lengths[src], 0)
        if src is None or not bool((plen > 0).any()):
            n_seg, max_len = int(starts.numel()), int(lengths.max())  # one host sync per forward
            scatter = seg * max_len + (pos - starts[seg])
            gather = torch.zeros(n_seg * max_len, dtype=torch.long, device=flat.device)
            gather[scatter] = pos
            return SegmentLayout(gather=gather, scatter=scatter, n_seg=n_seg, max_len=max_len)
        # A prefix segment gets no row of its own: its tokens are owned by their copy in its first reader's row
        # (causal over the prefix there, exactly its own attention), so no row is spent on a short prefix.
        readers = torch.nonzero(plen > 0)[:, 0]  # segments with a prefix, ascending
        is_prefix = torch.zeros_like(plen, dtype=torch.bool)
        is_prefix[src[readers]] = True
        if bool((is_prefix & (plen > 0)).any()):
            raise ValueError("a prefix segment has a prefix of its own (chained prefix_ids); only one level of "
                             "shared prefix is supported")
        first = torch.full_like(plen, plen.numel())
        first.scatter_reduce_(0, src[readers], readers, reduce="amin")  # [n_seg] first reader of each prefix
        own_row = torch.cumsum((~is_prefix).to(torch.long), 0) - 1  # [n_seg] padded row of each non-prefix segment
        n_seg, max_len = int((~is_prefix).sum()), int((plen + lengths).max())  # one host sync per forward
        scatter = own_row[seg] * max_len + plen[seg] + (pos - starts[seg])
        cnt = plen[readers]
        r = torch.repeat_interleave(readers, cnt)  # [D + prefix tokens] reader segment of each copied slot
        t = torch.arange(int(cnt.sum()), device=flat.device) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt,
                                                                                       cnt)
        slot, at = own_row[r] * max_len + t, starts[src[r]] + t
        owner = first[src[r]] == r
        scatter[at[owner]] = slot[owner]
        gather = torch.zeros(n_seg * max_len, dtype=torch.long, device=flat.device)
        gather[slot] = at
        gather[scatter] = pos
        return SegmentLayout(gather=gather, scatter=scatter, n_seg=n_seg, max_len=max_len, dup_slot=slot[~owner],
                             dup_pos=at[~owner])


class _ToSegments(torch.autograd.Function):
    """rows [B*S, ...] -> padded segments [n_seg*L_max, ...] (index_select by `gather`).

    Backward is an index_select by `scatter` (each real position reads its own OWNER slot) instead of
    autograd's index_put_ with accumulate over `gather`, which also adds the padding slots' gradients into
    position 0. Those are exactly zero here: padding sits at the end of each causal segment row, so padded
    keys and values are attended only by padded queries, whose outputs `_FromSegments` drops (zero gradient).
    With shared prefixes, the copied prefix slots' gradients (`dup_slot`) are index_add-ed into their
    positions (`dup_pos`) on top: the prefix keys/values serve every row that copies them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor, dup_slot: Optional[torch.Tensor],
                dup_pos: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(scatter, dup_slot, dup_pos)
        return x.index_select(0, gather)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter, dup_slot, dup_pos = ctx.saved_tensors
        out = grad.index_select(0, scatter)
        if dup_slot is not None:
            out = out.index_add_(0, dup_pos, grad.index_select(0, dup_slot))
        return out, None, None, None, None


class _FromSegments(torch.autograd.Function):
    """padded segments [n_seg*L_max, ...] -> rows [B*S, ...] (index_select by `scatter`, injective).

    Backward writes each row's gradient into its slot (index_copy_), zero for padding slots.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scatter)
        ctx.n_slots = y.shape[0]
        return y.index_select(0, scatter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scatter,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.n_slots, *grad.shape[1:]))
        return out.index_copy_(0, scatter, grad), None


def _to_segments(x: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """[B, n, S, D] heads of packed rows -> [n_seg, n, L_max, D] padded segments (`_ToSegments`)."""
    b, n, s, d = x.shape
    flat = x.transpose(1, 2).reshape(b * s, n, d)
    seg = _ToSegments.apply(flat, layout.gather, layout.scatter, layout.dup_slot, layout.dup_pos)
    return seg.view(layout.n_seg, layout.max_len, n, d).transpose(1, 2)


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, *, scale: float,
                       gqa: bool) -> torch.Tensor:
    """q [B, Nl, S, D], k/v [B, KVl, S, D] -> [B, S, Nl, D]: causal attention inside each packed segment (and over
    all of its shared prefix segment, if the layout has one). No collectives."""
    b, _, s, d = q.shape
    out = F.scaled_dot_product_attention(_to_segments(q, layout), _to_segments(k, layout), _to_segments(v, layout),
                                         is_causal=True, scale=scale, enable_gqa=gqa)
    n_q = q.shape[1]
    out = _FromSegments.apply(out.transpose(1, 2).reshape(layout.n_seg * layout.max_len, n_q, d), layout.scatter)
    return out.view(b, s, n_q, d)


class _RecordedAttention(torch.autograd.Function):
    """Causal segment attention whose output the rollout's decode already computed (megaent.model.tape): the
    forward gathers the recorded output into the padded segment layout, the backward is the CPU flash
    kernel's own backward on (q, k, v, recorded output, recorded log-sum-exp), the same call a flash forward
    on these inputs would have led to. q [n, Nl, L, D], k/v [n, KVl, L, D]; rows [n * L] tape rows per slot."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_buf: torch.Tensor, lse_buf: torch.Tensor,
                rows: torch.Tensor, scale: float) -> torch.Tensor:
        n, nq, seq, d = q.shape
        out = out_buf.index_select(0, rows).view(n, seq, nq, d).transpose(1, 2)
        lse = lse_buf.index_select(0, rows).view(n, seq, nq).transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse, 0.0, True, attn_mask=None, scale=ctx.scale)
        return gq, gk, gv, None, None, None, None


def _recorded_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout,
                                recorded: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, scale: float
                                ) -> torch.Tensor:
    """`_segment_attention` with the output read from a rollout tape (see `SelfAttention.replay_attention`):
    the same [B, S, Nl, D] result; q/k/v still get their gradients (flash backward). Padding slots read the
    tape's unfed row (output 0, log-sum-exp +inf: zero attention weights in the backward)."""
    out_buf, lse_buf, idx = recorded
    b, n_q, s, d = q.shape
    if not torch.is_grad_enabled():  # no backward to feed: the recorded output in token order is all there is
        return out_buf.index_select(0, idx).view(b, s, n_q, d)
    real = torch.zeros(layout.n_seg * layout.max_len, dtype=torch.bool, device=q.device)
    real[layout.scatter] = True
    if layout.dup_slot is not None:
        real[layout.dup_slot] = True  # prefix copies: the prefix token's own output and log-sum-exp
    rows = torch.where(real, idx.index_select(0, layout.gather), out_buf.shape[0] - 1)
    out = _RecordedAttention.apply(_to_segments(q, layout), _to_segments(k, layout), _to_segments(v, layout),
                                   out_buf, lse_buf, rows, scale)
    out = _FromSegments.apply(out.transpose(1, 2).reshape(layout.n_seg * layout.max_len, n_q, d), layout.scatter)
    return out.view(b, s, n_q, d)


class SelfAttention(torch.nn.Module):
    """Grouped-query causal self-attention over this rank's Nl = N/TP query and KVl = KV/TP key/value heads.

    Qwen3 (`arch.qk_norm`): q and k pass a per-head RMSNorm over D before RoPE; the norm weights are replicated,
    so at TP > 1 each rank's gradient of them is the part from its own heads (their sum over tp_group is the
    full one, as megatron-core's finalize_model_grads sums its q/k layernorm gradients).

    TP wider than the KV heads (tp = m * KV): rank r holds its N/TP query heads and a 1/m slice of the rows of
    KV head g = r // m (the plain TP split of k_proj / v_proj, `megaent.model.hf_names`); one all-gather of
    the k/v activations on tp_group per layer rebuilds head g (backward: reduce-scatter), so KVl = 1.
    """

    def __init__(self, arch: ModelArch, *, tp_group: dist.ProcessGroup, tp: int, config: ModelParallelConfig):
        super().__init__()
        self.head_dim = arch.head_dim
        self.n_q = arch.num_attention_heads // tp
        self.n_kv = arch.local_kv_heads(tp)
        self.kv_split = max(1, tp // arch.num_key_value_heads)  # m: ranks sharing one KV head
        self.tp_group = tp_group
        self.kv_group = (dist.get_rank(tp_group) if tp > 1 else 0) // self.kv_split  # g: this rank's KV head
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, eps=arch.rms_norm_eps, dtype=config.params_dtype)
            self.k_norm = RMSNorm(arch.head_dim, eps=arch.rms_norm_eps, dtype=config.params_dtype)
        self.qkv = _ColumnParallelLinear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, config=config,
                                         init_method=_no_init, bias=arch.qkv_bias, gather_output=False,
                                         tp_group=tp_group)
        self.proj = _RowParallelLinear(arch.q_size, arch.hidden_size, config=config, init_method=_no_init,
                                       bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self.recompute_core = False
        """Selective activation checkpointing: recompute the core attention in backward (training only)."""
        self.replay_attention: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        """(output buffer [R, Nl*D], log-sum-exp buffer [R, Nl], tape rows [B*S]) while a rollout tape is replayed
        (megaent.model.tape.replaying): segment attention reads its output instead of computing it."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: "Optional[torch.Tensor | SegmentLayout]", *,
                kv_cache: Optional[KVCache] = None, slot: int = 0) -> torch.Tensor:
        """x [B, S, H], cos/sin [B, S, D], mask [B, 1, S, S_k] bool (True = attend) or None (plain causal)
        -> [B, S, H]. With `kv_cache`, new K/V are written to `slot` and attention spans cache + new tokens."""
        b, s, _ = x.shape
        d = self.head_dim
        qkv, _ = self.qkv(x)
        kv_rows = self.n_kv * d // self.kv_split
        q, k, v = qkv.split([self.n_q * d, kv_rows, kv_rows], dim=-1)
        if self.kv_split > 1:
            k, v = self._gather_kv_head(k, v)
        q = q.view(b, s, self.n_q, d).transpose(1, 2)  # [B, Nl, S, D]
        k = k.view(b, s, self.n_kv, d).transpose(1, 2)  # [B, KVl, S, D]
        v = v.view(b, s, self.n_kv, d).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(slot, k, v)
        if self.recompute_core and kv_cache is None and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v, mask, use_reentrant=False)
        else:
            out = self.core(q, k, v, mask)
        out, _ = self.proj(out)
        return out

    def _gather_kv_head(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v [B, S, D/m] slices of KV head g -> the whole head [B, S, D] each: one all-gather on tp_group
        (megatron-core's, so the backward reduce-scatters the gradient back to each slice)."""
        from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region

        b, s, rows = k.shape
        m, g = self.kv_split, self.kv_group
        both = all_gather_last_dim_from_tensor_parallel_region(torch.cat([k, v], dim=-1), group=self.tp_group)
        head = both.view(b, s, -1, 2, rows)[:, :, g * m:(g + 1) * m]  # [B, S, m, {k, v}, D/m] of head g
        return head[:, :, :, 0].reshape(b, s, m * rows), head[:, :, :, 1].reshape(b, s, m * rows)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: "Optional[torch.Tensor | SegmentLayout]") -> torch.Tensor:
        """Core attention: q [B, Nl, S, D], k/v [B, KVl, S_k, D] -> [B, S, Nl*D] (no parameters)."""
        b, _, s, d = q.shape
        if isinstance(mask, SegmentLayout):
            if self.replay_attention is not None:
                out = _recorded_segment_attention(q, k, v, mask, self.replay_attention, scale=1.0 / math.sqrt(d))
            else:
                out = _segment_attention(q, k, v, mask, scale=1.0 / math.sqrt(d), gqa=self.n_q != self.n_kv)
            return out.reshape(b, s, self.n_q * d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=1.0 / math.sqrt(d), enable_gqa=self.n_q != self.n_kv)
        return out.transpose(1, 2).reshape(b, s, self.n_q * d)


class SwiGLU(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020) with gate/up fused in one column-parallel linear."""

    def __init__(self, arch: ModelArch, *, tp_group: dist.ProcessGroup, config: ModelParallelConfig):
        super().__init__()
        self.gate_up = _ColumnParallelLinear(arch.hidden_size, 2 * arch.intermediate_size, config=config,
                                             init_method=_no_init, bias=False, gather_output=False,
                                             tp_group=tp_group)
        self.down = _RowParallelLinear(arch.intermediate_size, arch.hidden_size, config=config,
                                       init_method=_no_init, bias=False, input_is_parallel=True, skip_bias_add=False,
                                       tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]."""
        gate_up, _ = self.gate_up(x)
        out, _ = self.down(swiglu(gate_up))  # silu(gate) * up
        return out


class DecoderLayer(torch.nn.Module):
    """Pre-norm attention + SwiGLU block; for the MoE families (`arch.num_experts` > 0) the SwiGLU is
    `megaent.model.sparse_moe.SparseMoE`, named `moe` (table names `layers.{l}.moe.*`) instead of `mlp`."""

    def __init__(self, arch: ModelArch, *, tp_group: dist.ProcessGroup, tp: int, config: ModelParallelConfig):
        super().__init__()
        dtype = config.params_dtype
        self.input_norm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps, dtype=dtype)
        self.attn = SelfAttention(arch, tp_group=tp_group, tp=tp, config=config)
        self.post_norm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps, dtype=dtype)
        self.is_moe = bool(arch.num_experts)
        if self.is_moe:
            self.moe = SparseMoE(arch, tp_group=tp_group, tp=tp, dtype=dtype)
        else:
            self.mlp = SwiGLU(arch, tp_group=tp_group, config=config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: "Optional[torch.Tensor | SegmentLayout]", *,
                kv_cache: Optional[KVCache] = None, slot: int = 0) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; see `SelfAttention.forward` for the other arguments."""
        h = x + self.attn(self.input_norm(x), cos, sin, mask, kv_cache=kv_cache, slot=slot)
        return h + (self.moe if self.is_moe else self.mlp)(self.post_norm(h))


def build_attention_mask(*, q_len: int, cache_len: int, key_mask: Optional[torch.Tensor],
                   segment_ids: Optional[torch.Tensor], batch: int, device: torch.device,
                   prefix_ids: Optional[torch.Tensor] = None) -> Union[None, torch.Tensor, SegmentLayout]:
    """Boolean attention mask [B, 1, S, S_k] (True = attend), None when plain causal attention suffices, or a
    `SegmentLayout` for packed rows without padding or cache (same result, linear instead of quadratic cost).

    Query i sits at absolute position cache_len + i and sees key j when j <= cache_len + i,
    key_mask[b, j] is True (key padding; S_k = cache_len + S) and, with segment_ids [B, S], the
    two tokens share a segment id (packed sequences). With prefix_ids [B, S] (shared prompt
    prefixes, needs segment_ids) a query also sees every key whose segment id equals its prefix
    id. Each query may always see its own position, so padded queries get a finite (ignored)
    output instead of NaN.
    """
    if prefix_ids is not None and segment_ids is None:
        raise ValueError("prefix_ids (shared prompt prefixes) need segment_ids: pass both or neither")
    if key_mask is None and segment_ids is None and cache_len == 0:
        return None
    if segment_ids is not None and key_mask is None and cache_len == 0:
        return SegmentLayout.from_segment_ids(segment_ids, prefix_ids)  # packed rows: per-segment attention
    s_k = cache_len + q_len
    q_pos = torch.arange(cache_len, s_k, device=device)[:, None]
    k_pos = torch.arange(s_k, device=device)[None, :]
    mask = (k_pos <= q_pos)[None].expand(batch, q_len, s_k)  # [B, S, S_k]
    if segment_ids is not None:
        if cache_len:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a non-empty kv_cache")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if prefix_ids is not None:  # shared prefix: the whole prefix segment, which precedes the query's segment
            mask = mask | ((prefix_ids[:, :, None] >= 0) & (segment_ids[:, None, :] == prefix_ids[:, :, None]))
    if key_mask is not None:
        if key_mask.shape != (batch, s_k):
            raise ValueError(f"attention_mask has shape {tuple(key_mask.shape)}; expected [B, S_k] = "
                             f"[{batch}, {s_k}] (S_k counts cached plus new tokens)")
        mask = mask & key_mask.to(torch.bool)[:, None, :]
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]
