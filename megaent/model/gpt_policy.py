"""`GPTPolicy`: this rank's stage of the policy as megatron-core's `GPTModel`, with megaent's HF view.

The module is megatron-core's own (`megaent.model.gpt`); this wrapper adds what RL needs on top:
- masked padded vocabulary: logits of padding rows are `finfo(dtype).min`, so they never change a
  probability (megatron-core leaves them at 0);
- `final_hidden`: the last stage's final-normed hidden states without the LM head, for the
  vocab-chunked fused head (`megaent.ops.fused_head_logprobs_entropy`);
- the HF view of the parameters: `param_specs()` names each parameter by megaent's HF table
  (`megaent.model.hf_names`), `fill_` loads it and `megaent_params()` reads it back in that
  table's local layout, so `load_hf` / `save_hf` and checkpoints serve both engines.

Parameter layouts (megatron-core's, which the embedded rollout engine reads as well):
- `linear_qkv` rows per query group: [q heads of the group (N/KV * D) | k (D) | v (D)], groups in
  order, TP = contiguous chunks of groups; megaent's table holds [q | k | v] of the rank's heads,
  `qkv_to_mcore` / `qkv_from_mcore` convert.
- `linear_fc1` = [gate shard; up shard], the same as megaent's `gate_up`.
- TP wider than the KV heads (tp = m * KV): megatron-core keeps the fused QKV in that per-group layout and
  gives rank r the r-th contiguous chunk of the whole matrix (a chunk can hold q rows of one group, or k and v
  of it); its attention all-gathers the QKV activations over TP and picks the rank's group and query heads
  (`Attention.get_query_key_value_tensors`), and the all-gather's backward reduce-scatter sums each chunk's
  gradient. megaent's table view of rank r stays the plain TP split of q, k and v (k/v rows of one KV head
  cut in m pieces), so the two layouts differ across ranks: `_to_mcore` / `_from_mcore` of the QKV weight
  and bias are then collective (one all-gather on tp_group each) and every TP rank must call them in order.
- Qwen3's q/k RMSNorm weights are megatron-core's `q_layernorm` / `k_layernorm` (replicated, [D]).
- MoE (Qwen3-MoE, Mixtral): router `mlp.router.weight` [E, H] (HF `gate`), expert e's `linear_fc1` /
  `linear_fc2` under `mlp.experts.local_experts.e`, TP-split like the dense MLP; with EP rank r of ep holds
  the experts r * E/ep ... (r+1) * E/ep - 1 (`hf_names.expert_range`) as local_experts 0 ... E/ep - 1, and
  its table view names only those (global ids), so load_hf reads only them.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch

from megaent.model.arch import ModelArch, stage_layer_ranges
from megaent.model.gpt import build_gpt, gpt_config
from megaent.model.hf_names import (ParamSpec, Part, build_local, expert_range, padded_vocab_size,
                                    stage_param_specs)
from megaent.parallel import ParallelState

_LAYER_NAMES = {  # megaent table name (after "layers.{i}.") -> GPTModel name (after "decoder.layers.{l}.")
    "input_norm.weight": "input_layernorm.weight",
    "attn.qkv.weight": "self_attention.linear_qkv.weight",
    "attn.qkv.bias": "self_attention.linear_qkv.bias",
    "attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "post_norm.weight": "pre_mlp_layernorm.weight",
    "mlp.gate_up.weight": "mlp.linear_fc1.weight",
    "mlp.down.weight": "mlp.linear_fc2.weight",
    "moe.router.weight": "mlp.router.weight",
}
_TE_NORMS = {"input_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "post_norm.weight": "mlp.linear_fc1.layer_norm_weight"}
_TOP_NAMES = {"embed.weight": "embedding.word_embeddings.weight", "final_norm.weight": "decoder.final_layernorm.weight",
              "head.weight": "output_layer.weight"}


def qkv_to_mcore(t: torch.Tensor, *, groups: int, q_per_group: int, head_dim: int) -> torch.Tensor:
    """[q (G*R*D) | k (G*D) | v (G*D)] rows -> per group [q_g (R*D) | k_g (D) | v_g (D)]; weight or bias."""
    rest = t.shape[1:]
    q, k, v = t.split([groups * q_per_group * head_dim, groups * head_dim, groups * head_dim])
    q = q.reshape(groups, q_per_group * head_dim, *rest)
    k, v = k.reshape(groups, head_dim, *rest), v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_mcore(t: torch.Tensor, *, groups: int, q_per_group: int, head_dim: int) -> torch.Tensor:
    """Inverse of `qkv_to_mcore`."""
    rest = t.shape[1:]
    q, k, v = t.reshape(groups, (q_per_group + 2) * head_dim, *rest).split(
        [q_per_group * head_dim, head_dim, head_dim], dim=1)
    return torch.cat([x.reshape(-1, *rest) for x in (q, k, v)])


class GPTPolicy(torch.nn.Module):
    """This rank's stage and TP shard of the policy on megatron-core `GPTModel`."""

    def __init__(self, arch: ModelArch, state: ParallelState, *, dtype: torch.dtype = torch.float32,
                 pipeline_layers: Optional[list[int]] = None, vocab_multiple: int = 1, backend: str = "local",
                 sequence_parallel: Optional[bool] = None, recompute: str = "none", fp8: Optional[str] = None
                 ) -> None:
        super().__init__()
        self.arch, self.state, self.dtype, self.backend = arch, state, dtype, backend
        self.pipeline_layers = pipeline_layers
        self.source_dir: Optional[str] = None
        self.activation_checkpointing = recompute != "none"
        sp = state.tp > 1 if sequence_parallel is None else sequence_parallel
        self.config = gpt_config(arch, tp=state.tp, pp=state.pp, dtype=dtype, sequence_parallel=sp,
                                 pipeline_layers=pipeline_layers, recompute=recompute, fp8=fp8, ep=state.ep)
        self.vocab_size = arch.vocab_size
        self.padded_vocab_size = padded_vocab_size(arch.vocab_size, state.tp, multiple=vocab_multiple)
        vl = self.padded_vocab_size // state.tp
        self.vocab_range = (state.tp_rank * vl, (state.tp_rank + 1) * vl)
        self.local_vocab_valid = max(0, min(vl, arch.vocab_size - self.vocab_range[0]))
        self.layer_ids = list(stage_layer_ranges(arch.num_hidden_layers, state.pp, pipeline_layers)[state.pp_rank])
        self.head_reuses_embedding = arch.tie_word_embeddings and state.pp == 1
        self.model = build_gpt(arch, self.config, padded_vocab=self.padded_vocab_size, pp_rank=state.pp_rank,
                               pp=state.pp, backend=backend)
        pad = torch.arange(vl) >= self.local_vocab_valid
        self.register_buffer("_vocab_pad", pad if bool(pad.any()) else None, persistent=False)
        self.to(state.device)
        self._qkv = dict(groups=arch.num_key_value_heads // state.tp,
                         q_per_group=arch.num_attention_heads // arch.num_key_value_heads, head_dim=arch.head_dim)
        self._kv_split = state.tp > arch.num_key_value_heads  # megatron-core's all-gathered QKV (docstring)
        self.experts = expert_range(arch, state.ep_rank, state.ep) if arch.num_experts else None

    # ---- names ----------------------------------------------------------------------------------------------
    def param_specs(self) -> list[ParamSpec]:
        """HF names and TP kinds of this stage's parameters, by megaent's table (`megaent.model.hf_names`)."""
        st = self.state
        return stage_param_specs(self.arch, layers=self.layer_ids, first=st.is_first_stage, last=st.is_last_stage,
                                 separate_head=not self.head_reuses_embedding, experts=self.experts)

    def mcore_name(self, name: str) -> str:
        """megaent table name -> this stage's GPTModel parameter name (local layer index)."""
        if name in _TOP_NAMES:
            return "model." + _TOP_NAMES[name]
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None or int(m.group(1)) not in self.layer_ids:
            raise KeyError(f"{name!r} is not a parameter of pipeline stage {self.state.pp_rank}")
        rest = m.group(2)
        e = re.fullmatch(r"moe\.experts\.(\d+)\.(gate_up|down)\.weight", rest)
        if e is not None:  # global expert id -> this EP rank's local index
            if int(e.group(1)) not in self.experts:
                raise KeyError(f"{name!r}: expert {e.group(1)} lives on another EP rank (this one holds "
                               f"{self.experts.start}..{self.experts.stop - 1})")
            fc = "linear_fc1" if e.group(2) == "gate_up" else "linear_fc2"
            tail = f"mlp.experts.local_experts.{int(e.group(1)) - self.experts.start}.{fc}.weight"
        else:
            tail = (_TE_NORMS.get(rest) if self.backend == "te" else None) or _LAYER_NAMES[rest]
        return f"model.decoder.layers.{self.layer_ids.index(int(m.group(1)))}.{tail}"

    def _to_mcore(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """megaent table shard -> GPTModel shard (collective for the QKV when tp > KV heads, see above)."""
        if ".attn.qkv." not in name:
            return local
        if not self._kv_split:
            return qkv_to_mcore(local, **self._qkv)
        full = qkv_to_mcore(self._qkv_table_full(local), **self._kv_full)  # [(N + 2 KV) D, ...] mcore order
        return full.chunk(self.state.tp)[self.state.tp_rank].clone()

    def _from_mcore(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """GPTModel shard -> megaent table shard (a copy for the QKV; collective when tp > KV heads)."""
        if ".attn.qkv." not in name:
            return param
        if not self._kv_split:
            return qkv_from_mcore(param, **self._qkv)
        full = qkv_from_mcore(self._tp_all_gather(param), **self._kv_full)  # [q | k | v] of all heads
        a = self.arch
        q, k, v = full.split([a.q_size, a.kv_size, a.kv_size])
        r, tp = self.state.tp_rank, self.state.tp
        return torch.cat([x.chunk(tp)[r] for x in (q, k, v)])

    @property
    def _kv_full(self) -> dict[str, int]:
        a = self.arch
        return dict(groups=a.num_key_value_heads, q_per_group=a.num_attention_heads // a.num_key_value_heads,
                    head_dim=a.head_dim)

    def _qkv_table_full(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's [q_r | k_r | v_r] table shard -> the full [q | k | v] (one all-gather on tp_group)."""
        a, tp = self.arch, self.state.tp
        shards = self._tp_all_gather(local).chunk(tp)
        parts = [s.split([a.q_size // tp, a.kv_size // tp, a.kv_size // tp]) for s in shards]
        return torch.cat([torch.cat([p[j] for p in parts]) for j in range(3)])

    def _tp_all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Shards [R, ...] of every TP rank, concatenated in rank order along dim 0 (no autograd)."""
        import torch.distributed as dist

        t = t.detach().contiguous()
        out = [torch.empty_like(t) for _ in range(self.state.tp)]
        dist.all_gather(out, t, group=self.state.tp_group)
        return torch.cat(out)

    @torch.no_grad()
    def fill_(self, read: Callable[[Part], torch.Tensor]) -> None:
        """Copy every local parameter from `read(part)` (the part's local TP shard, see hf_names.tp_slice)."""
        params = dict(self.named_parameters())
        specs = self.param_specs()
        names = {self.mcore_name(s.name) for s in specs}
        missing = sorted(set(params) - names)
        assert not missing, f"GPTModel parameters without an HF name: {missing}"
        for spec in specs:
            param = params[self.mcore_name(spec.name)]
            local = self._to_mcore(spec.name, build_local(spec, read))
            if tuple(local.shape) != tuple(param.shape):
                raise ValueError(f"{spec.name}: checkpoint shard has shape {tuple(local.shape)}, the model expects "
                                 f"{tuple(param.shape)}; does config.json match the weights?")
            param.copy_(local)

    def megaent_params(self) -> dict[str, torch.Tensor]:
        """{megaent table name: this rank's shard in the table's local layout} (views where the layouts agree).
        Collective when tp > KV heads (one all-gather on tp_group per layer's QKV): call it on every TP rank."""
        params = dict(self.named_parameters())
        return {s.name: self._from_mcore(s.name, params[self.mcore_name(s.name)]) for s in self.param_specs()}

    # ---- forward --------------------------------------------------------------------------------------------
    @property
    def head_weight(self) -> torch.Tensor:
        """Last stage: LM head shard [Vl, H]; rows >= `local_vocab_valid` are zero padding (mask their logits)."""
        if not self.state.is_last_stage:
            raise RuntimeError(f"head_weight lives on the last pipeline stage; this is stage {self.state.pp_rank}")
        return self.model.shared_embedding_or_output_weight() if self.arch.tie_word_embeddings else \
            self.model.output_layer.weight

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab-sharded logits [..., Vl] with this shard's padding entries set to finfo(dtype).min."""
        if self._vocab_pad is not None:
            logits = logits.masked_fill(self._vocab_pad, torch.finfo(logits.dtype).min)
        return logits

    def forward(self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None, *,
                hidden_states: Optional[torch.Tensor] = None, packed_seq_params: Any = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, S] long (first stage) -> vocab-sharded logits [B, S, Vl] (padding masked) on the last
        stage, hidden states [S(/TP with sequence parallel), B, H] elsewhere. A later stage takes the previous
        stage's output as `hidden_states` (or from the schedule's `set_input_tensor`). position_ids are not
        needed: RoPE follows the sequence, or each packed segment (THD `packed_seq_params`).
        Collectives: megatron-core's (2 all-reduces or SP all-gather/reduce-scatter pairs per layer on TP)."""
        del position_ids
        self._check_window(input_ids, hidden_states, packed_seq_params)
        if hidden_states is not None:
            self.model.set_input_tensor(hidden_states)
        out = self.model(input_ids, None, attention_mask, packed_seq_params=packed_seq_params)
        return self.mask_padded_vocab(out) if self.state.is_last_stage else out

    def _check_window(self, input_ids: Optional[torch.Tensor], hidden_states: Optional[torch.Tensor],
                      packed_seq_params: Any) -> None:
        """Refuse sequences longer than the checkpoint's sliding window (`ModelArch.check_sequence_length`)."""
        if self.arch.sliding_window is None:
            return
        if packed_seq_params is not None:
            n = packed_seq_params.max_seqlen_q
            if n is None:
                cu = packed_seq_params.cu_seqlens_q
                n = int((cu[1:] - cu[:-1]).max())
        elif input_ids is not None:
            n = input_ids.shape[1]
        elif hidden_states is not None:
            n = hidden_states.shape[0] * (self.state.tp if self.config.sequence_parallel else 1)
        else:
            return  # the schedule's input tensor: the first stage checked the token ids
        self.arch.check_sequence_length(int(n))

    def final_hidden(self, input_ids: Optional[torch.Tensor] = None, *, hidden_states: Optional[torch.Tensor] = None,
                     packed_seq_params: Any = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last stage: final-normed hidden states [B, S, H] (all TP ranks, sequence gathered), no LM head.
        Other stages: what `forward` returns (their output hidden states [S(/TP), B, H])."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if not self.state.is_last_stage:
            return self(input_ids, hidden_states=hidden_states, packed_seq_params=packed_seq_params,
                        attention_mask=attention_mask)
        self._check_window(input_ids, hidden_states, packed_seq_params)
        if hidden_states is not None:
            self.model.set_input_tensor(hidden_states)
        self.model.post_process = False  # GPTModel returns the decoder's (final-normed) output before the head
        try:
            h = self.model(input_ids, None, attention_mask, packed_seq_params=packed_seq_params)  # [S(/TP), B, H]
        finally:
            self.model.post_process = True
        if self.config.sequence_parallel:
            # backward = split only: the fused head already sums grad_hidden over TP (it all-reduces)
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False,
                                                     group=self.state.tp_group)
        return h.transpose(0, 1)
