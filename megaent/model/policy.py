"""`Policy`: the local pipeline stage of a decoder (the families of `megaent.model.arch`) over TP x PP.

A rank holds only its stage's decoder layers (global indices, even split by
default or `pipeline_layers`), plus the vocab-parallel embedding on the first
stage and the final norm + vocab-parallel LM head on the last. The vocabulary
is padded to a multiple of TP (megatron's `VocabParallelEmbedding` splits the
padded size evenly); padded embedding/head rows are zero and padded logits are
set to `torch.finfo(dtype).min` (not -inf, so p * log p stays finite in
entropy code), which gives them probability exactly 0 after softmax.

Tied embeddings: with PP = 1 the head reuses `embed.weight`; with PP > 1 the
last stage owns `head.weight`, initialised from the same tensor, and
`shared_embedding_parameters()` lists the pair so the engine all-reduces their
gradients over `state.embedding_group` (as Megatron-LM does).

MoE families (Qwen3-MoE, Mixtral): every layer's MLP is `megaent.model.sparse_moe.SparseMoE`, all experts
on every rank, TP-split like the dense MLP; a state with EP > 1 is refused (ConfigError naming parallel.ep).
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Callable, ContextManager, Optional

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch.utils.checkpoint import checkpoint

from megaent.model.arch import ModelArch, stage_layer_ranges
from megaent.model.cache import KVCache
from megaent.model.hf_names import (ParamSpec, Part, build_local, padded_vocab_size, stage_param_specs,
                                    tp_slice)
from megaent.model.layers import (DecoderLayer, RMSNorm, _ColumnParallelLinear, _no_init, build_attention_mask,
                                  tp_layer_config)
from megaent.model.rope import inv_frequencies, rope_cos_sin
from megaent.parallel import ParallelState


class Policy(torch.nn.Module):
    """This rank's stage and TP shard of the decoder. Build with `build_policy` or `load_hf`."""

    def __init__(self, arch: ModelArch, state: ParallelState, *, dtype: torch.dtype = torch.float32,
                 pipeline_layers: Optional[list[int]] = None, vocab_multiple: int = 1,
                 activation_checkpointing: bool = False):
        super().__init__()
        if arch.num_experts and getattr(state, "ep", 1) > 1:
            from megaent.config.errors import ConfigError

            # the trainer's ranks hold only their experts: bound to them, this decoder's others would go stale
            raise ConfigError(f"parallel.ep={state.ep}: megaent's own decoder (embedded rollout engine) holds all "
                              f"{arch.num_experts} experts of {arch.model_type} (EP = 1) and cannot follow an "
                              f"expert-parallel trainer; use rollout.engine=http (megaent serve) or sglang, or "
                              f"parallel.ep=1")
        arch.check_layout(tp=state.tp, pp=state.pp, pipeline_layers=pipeline_layers)
        self.arch, self.state, self.dtype = arch, state, dtype
        self.pipeline_layers = pipeline_layers
        self.vocab_multiple = vocab_multiple
        self.activation_checkpointing = activation_checkpointing
        self.compute_context: Callable[[], ContextManager] = contextlib.nullcontext
        """Entered around the decoder layers of each forward: TE fp8_autocast or bf16 autocast
        (`megaent.model.backends.apply_backend`); a no-op by default."""
        self.source_dir: Optional[str] = None  # HF dir this was loaded from (tokenizer files for save_hf)
        self.layer_ids = list(stage_layer_ranges(arch.num_hidden_layers, state.pp, pipeline_layers)[state.pp_rank])
        self.vocab_size = arch.vocab_size
        self.padded_vocab_size = padded_vocab_size(arch.vocab_size, state.tp, multiple=vocab_multiple)
        vl = self.padded_vocab_size // state.tp
        self.vocab_range = (state.tp_rank * vl, (state.tp_rank + 1) * vl)
        self.local_vocab_valid = max(0, min(vl, arch.vocab_size - self.vocab_range[0]))
        """Rows of this rank's head shard that are real tokens (the rest is padding)."""
        self.head_reuses_embedding = arch.tie_word_embeddings and state.pp == 1

        cfg = tp_layer_config(dtype)
        grp, h = state.tp_group, arch.hidden_size
        if state.is_first_stage:
            self.embed = VocabParallelEmbedding(self.padded_vocab_size, h, init_method=_no_init, config=cfg,
                                                tp_group=grp)
        self.layers = torch.nn.ModuleDict({str(l): DecoderLayer(arch, tp_group=grp, tp=state.tp, config=cfg)
                                           for l in self.layer_ids})
        if state.is_last_stage:
            self.final_norm = RMSNorm(h, eps=arch.rms_norm_eps, dtype=dtype)
            self.head = _ColumnParallelLinear(h, self.padded_vocab_size, config=cfg, init_method=_no_init, bias=False,
                                              gather_output=False, tp_group=grp,
                                              skip_weight_param_allocation=self.head_reuses_embedding)
            pad = torch.arange(vl) >= self.local_vocab_valid
            self.register_buffer("_vocab_pad", pad if bool(pad.any()) else None, persistent=False)
        self.register_buffer("inv_freq", inv_frequencies(arch), persistent=False)
        self.to(state.device)
        for p in self.shared_embedding_parameters():
            p.shared_embedding = True  # the attribute megatron-core uses for the same purpose

    # ---- structure -------------------------------------------------------------------------------------------
    def param_specs(self) -> list[ParamSpec]:
        """HF names and TP kinds of this stage's parameters (`megaent.model.hf_names`)."""
        return stage_param_specs(self.arch, layers=self.layer_ids, first=self.state.is_first_stage,
                                 last=self.state.is_last_stage, separate_head=not self.head_reuses_embedding)

    def shared_embedding_parameters(self) -> list[torch.nn.Parameter]:
        """Params whose grads must be all-reduced over `state.embedding_group` (tied embeddings with PP > 1)."""
        if not self.arch.tie_word_embeddings or self.state.pp == 1:
            return []
        out = []
        if self.state.is_first_stage:
            out.append(self.embed.weight)
        if self.state.is_last_stage:
            out.append(self.head.weight)
        return out

    @property
    def head_weight(self) -> torch.Tensor:
        """Last stage: LM head shard [Vl, H]; rows >= `local_vocab_valid` are zero padding (mask their logits)."""
        if not self.state.is_last_stage:
            raise RuntimeError(f"head_weight lives on the last pipeline stage; this is stage {self.state.pp_rank}")
        return self.embed.weight if self.head_reuses_embedding else self.head.weight

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None, *,
                hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                prefix_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run this stage.

        input_ids [B, S] long (first stage) or hidden_states [B, S, H] (other stages);
        position_ids [B, S] long, default arange offset by the cache length (packed or
        left-padded batches pass their own); attention_mask [B, S_k] bool key padding
        (True = real token, S_k = cached + new tokens); segment_ids [B, S] (packed
        sequences: attention is causal within equal ids); prefix_ids [B, S] (shared
        prompt prefixes of packed rows: a token also sees all of the segment whose id
        is its prefix id, -1 = none; `megaent.trainer.batching.MicroBatch`);
        kv_cache: see `KVCache`.
        Returns hidden states [B, S, H] on a non-last stage, else vocab-sharded logits
        [B, S, Vl] in the model dtype with padded entries = finfo(dtype).min.
        Collectives: 2 all-reduces on tp_group per layer (+1 for the embedding); none on pp_group.
        """
        h = self._trunk(input_ids, position_ids, hidden_states, attention_mask, segment_ids, kv_cache,
                        prefix_ids=prefix_ids)
        if not self.state.is_last_stage:
            return h
        return self.compute_logits(self.final_norm(h))

    def final_hidden(self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None, *,
                     hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                     segment_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                     prefix_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last stage: final-normed hidden states [B, S, H] (no head), for fused head + loss ops."""
        if not self.state.is_last_stage:
            raise RuntimeError(f"final_hidden runs on the last pipeline stage; this is stage {self.state.pp_rank}")
        return self.final_norm(self._trunk(input_ids, position_ids, hidden_states, attention_mask, segment_ids,
                                           kv_cache, prefix_ids=prefix_ids))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [B, S, H] -> vocab-sharded logits [B, S, Vl] (padding masked). No collectives."""
        logits, _ = self.head(hidden, weight=self.embed.weight if self.head_reuses_embedding else None)
        return self.mask_padded_vocab(logits)

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab-sharded logits [..., Vl] with this shard's padding entries set to finfo(dtype).min."""
        if self._vocab_pad is not None:
            logits = logits.masked_fill(self._vocab_pad, torch.finfo(logits.dtype).min)
        return logits

    def _trunk(self, input_ids, position_ids, hidden_states, attention_mask, segment_ids, kv_cache, *,
               prefix_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.state.is_first_stage:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids [B, S]")
            x = self.embed(input_ids)
        else:
            if hidden_states is None:
                raise ValueError(f"pipeline stage {self.state.pp_rank} needs hidden_states [B, S, H] from the "
                                 f"previous stage")
            x = hidden_states
        b, s = x.shape[:2]
        cache_len = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(cache_len, cache_len + s, device=x.device).expand(b, s)
        if self.arch.sliding_window is not None and cache_len + s > self.arch.sliding_window:
            # padded or packed rows can be longer than their sequences: the positions count real tokens (1 sync)
            self.arch.check_sequence_length(int(position_ids.max()) + 1)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        mask = build_attention_mask(q_len=s, cache_len=cache_len, key_mask=attention_mask, segment_ids=segment_ids,
                                    batch=b, device=x.device, prefix_ids=prefix_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        with self.compute_context():
            for slot, layer in enumerate(self.layers.values()):
                if recompute:
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, mask, kv_cache=kv_cache, slot=slot)
        if kv_cache is not None:
            kv_cache.advance(s)
        return x

    # ---- weights ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fill_(self, read: Callable[[Part], torch.Tensor]) -> None:
        """Copy every local parameter from `read(part)` (the part's local TP shard, see hf_names.tp_slice)."""
        params = dict(self.named_parameters())
        specs = self.param_specs()
        missing = set(params) - {s.name for s in specs}
        assert not missing, f"parameters without an HF name: {sorted(missing)}"
        for spec in specs:
            local = build_local(spec, read)
            param = params[spec.name]
            if tuple(local.shape) != tuple(param.shape):
                raise ValueError(f"{spec.name}: checkpoint shard has shape {tuple(local.shape)}, the model expects "
                                 f"{tuple(param.shape)}; does config.json match the weights?")
            param.copy_(local)


def _random_full(part: Part, seed: int, *, std: float = 0.02) -> torch.Tensor:
    """Deterministic full tensor for `part`, the same whatever the TP x PP layout (seeded by name)."""
    if part.hf_name.endswith("norm.weight") or part.hf_name.endswith("layernorm.weight"):
        return torch.ones(part.shape)
    if part.hf_name.endswith(".bias"):
        return torch.zeros(part.shape)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{part.hf_name}".encode()))
    return torch.randn(part.shape, generator=gen) * std


def build_policy(arch: ModelArch, state: ParallelState, *, dtype: torch.dtype = torch.float32,
                 pipeline_layers: Optional[list[int]] = None, seed: int = 0, vocab_multiple: int = 1,
                 activation_checkpointing: bool = False) -> Policy:
    """A randomly initialised policy (normal(0, 0.02) weights, unit norms, zero biases).

    Every full tensor is drawn from a generator seeded by (seed, HF name) and then sharded,
    so the model is identical for every TP x PP layout. No collectives.
    """
    policy = Policy(arch, state, dtype=dtype, pipeline_layers=pipeline_layers, vocab_multiple=vocab_multiple,
                    activation_checkpointing=activation_checkpointing)

    def read(part: Part) -> torch.Tensor:
        return tp_slice(_random_full(part, seed), part.shape, part.kind, state.tp_rank, state.tp,
                        padded_rows=policy.padded_vocab_size, what=part.hf_name)

    policy.fill_(read)
    return policy
