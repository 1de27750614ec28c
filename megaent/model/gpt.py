"""The policy as megatron-core's `GPTModel`, built from a `ModelArch` (the one HF config map).

`gpt_config(arch, ...)` maps the HF architecture onto megatron-core's `TransformerConfig`;
`layer_spec(arch, backend=...)` picks the layer spec: megatron-core's local spec on CPU with
two megaent modules where the local one falls short, or the Transformer Engine spec on GPUs
(`model.backend=te`); `build_gpt` builds this rank's pipeline stage.

megaent's two modules in the local spec (both keep megatron-core's interfaces):
- `RMSNorm`: HF's RMSNorm (fp32 statistics, cast back before the weight, as Qwen2/Llama
  compute it) that also runs with sequence parallelism (megatron's `WrappedTorchNorm`
  refuses it); its weight carries `sequence_parallel` so megatron's `finalize_model_grads`
  all-reduces its gradient over TP, as it does for TE's norms.
- `PackedCoreAttention`: causal attention for megatron's `[S, B, heads, D]` layout and for
  packed micro-batches in the THD layout (`PackedSeqParams`, cu_seqlens): each segment
  attends only to itself, at a cost of sum(L_seg^2) (megatron's local `DotProductAttention`
  refuses packed sequences). GQA via SDPA's `enable_gqa`; fp32 softmax.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megaent.model.arch import ModelArch, stage_layer_ranges

BACKENDS = ("local", "te")


class RMSNorm(torch.nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) as HF Qwen2/Llama compute it; megatron-core norm signature.

    x [..., H] -> [..., H] in x's dtype: statistics in fp32, cast back, then times the weight.
    No collectives (with sequence parallelism the weight's gradient is all-reduced over TP by
    megatron-core's `finalize_model_grads`, which reads `weight.sequence_parallel`).
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class PackedCoreAttention(torch.nn.Module):
    """Causal softmax(q k^T / sqrt(D)) v with megatron-core's core-attention signature.

    q [S, B, Nl, D], k/v [S, B, KVl, D] -> [S, B, Nl * D]; or, packed (THD, `packed_seq_params`
    with cu_seqlens_q): q [T, Nl, D], k/v [T, KVl, D] -> [T, Nl * D], causal within each segment.
    An explicit `attention_mask` [B, 1, S, S] bool (True = masked, megatron's convention) replaces
    the causal mask. Nl/KVl are this TP rank's heads. No collectives.
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 **_: Any) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
            raise ValueError("megaent's packed core attention has no dropout; RL fine-tuning runs with "
                             "attention_dropout=0")
        kv = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.scale = softmax_scale if softmax_scale is not None else kv ** -0.5

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q [B, N, L, D], k/v [B, KV, L, D] -> [B, N, L, D]; causal unless `mask` (True = may attend)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None, attention_bias: Any = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by megaent's packed core attention")
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q.tolist()
            outs = []
            for lo, hi in zip(cu[:-1], cu[1:]):  # one causal SDPA per segment: cost sum(L^2)
                seg = [t[lo:hi].transpose(0, 1).unsqueeze(0) for t in (query, key, value)]  # [1, N, L, D]
                outs.append(self._attend(*seg, None)[0].transpose(0, 1))  # [L, N, D]
            out = torch.cat(outs) if outs else query.new_zeros(query.shape)
            return out.reshape(out.shape[0], -1)
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, N, S, D]
        mask = None if attention_mask is None else ~attention_mask
        out = self._attend(q, k, v, mask)  # [B, N, S, D]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def gpt_config(arch: ModelArch, *, tp: int, pp: int, dtype: torch.dtype = torch.float32,
               sequence_parallel: bool = False, pipeline_layers: Optional[list[int]] = None,
               recompute: str = "none", fp8: Optional[str] = None, variable_seq_lengths: bool = True,
               ep: int = 1) -> Any:
    """megatron-core `TransformerConfig` for `arch` on a tp x pp layout.

    Fusions that need apex/TE kernels are off (the TE spec brings its own); dropout 0; CPU
    allocation, no megatron init (weights come from a checkpoint or `megaent.model.bridge`).
    recompute: "none" | "selective" | "full" (megatron-core's activation recomputation).
    fp8: None, or a Transformer Engine recipe name ("delayed", "tensorwise", "mxfp8", ...).
    ep: expert-parallel size (MoE only; `ModelArch.check_experts` validates it).
    """
    from megatron.core.transformer import TransformerConfig

    arch.check_layout(tp=tp, pp=pp, pipeline_layers=pipeline_layers)
    first = last = None
    if pipeline_layers is not None:
        ranges = stage_layer_ranges(arch.num_hidden_layers, pp, pipeline_layers)
        inner = {len(r) for r in ranges[1:-1]}
        if len(inner) > 1:
            raise ValueError(f"model.pipeline_layers={pipeline_layers}: megatron-core splits uneven pipelines by "
                             "the first and last stage only; give the inner stages equal layer counts")
        first, last = len(ranges[0]), len(ranges[-1])
    kw: dict[str, Any] = {}
    if recompute != "none":
        kw["recompute_granularity"] = recompute
        if recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    if arch.num_experts:
        arch.check_experts(ep)
        kw.update(_moe_config(arch), expert_model_parallel_size=ep)
        # megatron-core's alltoall dispatcher opens a CUDA stream at build; the allgather one runs anywhere but
        # refuses variable_seq_lengths (MoE pipelines then need equal micro-batch lengths)
        variable_seq_lengths = False
    else:
        # variable-length packed micro-batches through the pipeline; megatron-core's validation accepts
        # variable_seq_lengths only with this dispatcher setting, even without MoE.
        kw["moe_token_dispatcher_type"] = "alltoall"
    if fp8:
        kw.update(fp8="hybrid" if fp8 == "delayed" else "e4m3", fp8_recipe=fp8, fp8_amax_history_len=1024,
                  fp8_amax_compute_algo="max")
    return TransformerConfig(
        num_layers=arch.num_hidden_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
        # q/k RMSNorm (Qwen3); finalize_model_grads then sums their weight gradients over TP (each rank's heads)
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, use_cpu_initialization=True, perform_initialization=False,
        variable_seq_lengths=variable_seq_lengths, **kw,
    )


def _moe_config(arch: ModelArch) -> dict[str, Any]:
    """megatron-core MoE settings reproducing HF Qwen3-MoE / Mixtral routing: softmax router; with
    renormalisation top-k of the logits then softmax over the k (= softmax, top-k, renormalise), without it
    softmax over all experts then top-k (`moe_router_pre_softmax`). No aux loss inside megatron-core (the
    load-balancing loss is the trainer's, as HF defines it); sequential experts (no grouped GEMM); with EP the
    allgather dispatcher gathers the tokens over TP x EP and each rank runs its num_experts / ep experts."""
    return dict(num_moe_experts=arch.num_experts, moe_router_topk=arch.experts_per_token,
                moe_ffn_hidden_size=arch.moe_intermediate_size, moe_router_score_function="softmax",
                moe_router_pre_softmax=not arch.moe_renormalize, moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0, moe_grouped_gemm=False, moe_token_dispatcher_type="allgather")


def layer_spec(arch: ModelArch, config: Any, *, backend: str = "local", pp_rank: int = 0) -> Any:
    """This stage's `TransformerBlockSubmodules`: megatron-core's local spec with megaent's `RMSNorm` and
    `PackedCoreAttention`, or the Transformer Engine spec (`backend="te"`)."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if backend not in BACKENDS:
        raise ValueError(f"model.backend={backend!r}: choose one of {BACKENDS}")
    n = get_num_layers_to_build(config, pp_rank=pp_rank)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=arch.num_experts or None,
                                                          qk_layernorm=arch.qk_norm)
        return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=TENorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=arch.num_experts or None, qk_layernorm=arch.qk_norm,
                                                  normalization="RMSNorm"))
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
    if arch.qk_norm:  # per head, over D; megatron builds them with hidden_size = head_dim
        sub.self_attention.submodules.q_layernorm = sub.self_attention.submodules.k_layernorm = RMSNorm
    sub.self_attention.submodules.core_attention = ModuleSpec(module=PackedCoreAttention)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


def build_gpt(arch: ModelArch, config: Any, *, padded_vocab: int, pp_rank: int, pp: int,
              backend: str = "local") -> Any:
    """This rank's stage of the policy: megatron-core `GPTModel` (pre_process on the first stage, post_process
    on the last), RoPE as the checkpoint defines it, vocab-parallel output (logits [.., padded V / TP])."""
    from megatron.core.models.gpt import GPTModel

    rope: dict[str, Any] = {}
    if arch.rope_type == "linear":
        rope["seq_len_interpolation_factor"] = float(arch.rope_scaling["factor"])
    elif arch.rope_type == "llama3":
        _check_llama3_rope(arch)
        rope.update(rope_scaling=True, rope_scaling_factor=float(arch.rope_scaling["factor"]))
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(arch, config, backend=backend, pp_rank=pp_rank),
        vocab_size=padded_vocab, max_sequence_length=arch.max_position_embeddings,
        pre_process=pp_rank == 0, post_process=pp_rank == pp - 1, parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=int(arch.rope_theta), **rope,
    )
    mark_tensor_parallel(model)
    return model


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Give TP-sharded weights megatron-core's `tensor_model_parallel` attributes.

    megatron-core sets them only while initialising weights (`perform_initialization=True`); megaent fills
    weights from checkpoints instead, and without the marks the grad-norm (clipping), the distributed optimizer
    and checkpoint code take rank 1's shards for TP duplicates (measured: grad norm 1.80 vs 2.46 at TP=2).
    """
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               set_tensor_model_parallel_attributes)

    for mod in model.modules():
        dim = 1 if isinstance(mod, RowParallelLinear) else 0
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            w = getattr(mod, "weight", None)
            if w is not None and not getattr(w, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(w, is_parallel=True, dim=dim, stride=1)


_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _check_llama3_rope(arch: ModelArch) -> None:
    """megatron-core hard-codes Llama 3.1's low/high frequency factors and original context; refuse others."""
    for key, want in _MCORE_LLAMA3.items():
        got = arch.rope_scaling.get(key, want)
        if float(got) != float(want):
            raise ValueError(f"config.json rope_scaling {key}={got}: megatron-core's llama3 RoPE fixes it at "
                             f"{want}; this checkpoint's RoPE cannot be reproduced exactly")
