"""backend=te: the decoder's TP linears and norms as Transformer Engine modules, same names and layouts.

`convert_to_te(policy)` swaps, in every local decoder layer, after the weights are loaded:
- attn.qkv, mlp.gate_up -> megatron-core `TEColumnParallelLinear` (TE `Linear`, parallel_mode="column"),
- attn.proj, mlp.down   -> megatron-core `TERowParallelLinear` (parallel_mode="row"),
- input_norm, post_norm -> `transformer_engine.pytorch.RMSNorm`,
copying each weight/bias into the new module. TE's parameters are called `weight` / `bias` like
megatron's, and the local shards have the same shapes and row layouts ([q | k | v] heads of this rank,
[gate | up] slices), so `hf_names`, `load_hf`/`save_hf`, weight sync and checkpoints (by parameter name)
work unchanged. TE keeps FP8 scaling state in `_extra_state` buffers; those are not parameters and are not
exported. Every module receives `tp_group=` explicitly.

Not done here, on purpose:
- TE's fused RMSNorm+linear (`TELayerNormColumnParallelLinear`) would rename the norm weight to
  `attn.qkv.layer_norm_weight` (a change to the HF name table) for one saved memory pass per layer.
- Sequence parallel: TE supports it (config.sequence_parallel; column layers all-gather, row layers
  reduce-scatter along dim 0), but the Policy trunk runs [B, S, H] with the full sequence on every TP rank;
  it would need a [S, B, H] trunk scattered over S after the embedding, gathered before the head, and an
  all-reduce over tp_group of the norm-weight grads. Left for a GPU session that can measure it.
- TE's attention: the core attention stays torch SDPA (flash / cuDNN kernels on H100).

FP8 caveat handled here: TE's FP8 GEMMs need the token count (rows of the flattened input) to be a multiple
of 16; packed micro-batches have any length, so inputs are zero-padded to the next multiple and the output
rows sliced back (`_pad_rows`). Weight casts: `disable_parameter_transpose_cache=True` makes TE re-cast the
weights to FP8 on every micro-batch; megatron's `is_first_microbatch` cache would otherwise need a reset by
the engine after each optimizer step (a stale FP8 weight copy is silent wrong training).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from megaent.model.arch import ModelArch

ROW_MULTIPLE = 16


def _pad_rows(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """fn over x [..., K] with the flattened rows zero-padded to a multiple of ROW_MULTIPLE; returns
    fn's (out [..., N], bias) with the padding sliced off. Rows are independent in a linear layer."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.numel() // k
    pad = (-rows) % ROW_MULTIPLE
    if pad == 0:
        return fn(x)
    flat = torch.nn.functional.pad(x.reshape(rows, k), (0, 0, 0, pad))
    out, bias = fn(flat)
    return out[:rows].reshape(*lead, out.shape[-1]), bias


def te_layer_config(arch: ModelArch, *, tp: int, dtype: torch.dtype) -> Any:
    """megatron-core TransformerConfig for the TE wrappers: GPU allocation, no init, no SP, no wgrad fusion."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_hidden_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.intermediate_size, tensor_model_parallel_size=tp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps, add_bias_linear=False, gated_linear_unit=True,
        use_cpu_initialization=False, perform_initialization=False, sequence_parallel=False,
        gradient_accumulation_fusion=False,  # our optimizer reads p.grad, not megatron's main_grad buffers
        disable_parameter_transpose_cache=True)


def _no_init(_: torch.Tensor) -> None:
    """Weights are copied from the local layer."""


def _te_classes() -> tuple[type, type]:
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    class Column(TEColumnParallelLinear):
        def forward(self, x: torch.Tensor):  # noqa: D102
            return _pad_rows(super().forward, x)

    class Row(TERowParallelLinear):
        def forward(self, x: torch.Tensor):  # noqa: D102
            return _pad_rows(super().forward, x)

    return Column, Row


@torch.no_grad()
def _copy_params(old: torch.nn.Module, new: torch.nn.Module, what: str) -> None:
    theirs = dict(new.named_parameters())
    for name, p in old.named_parameters():
        if name not in theirs or theirs[name].shape != p.shape:
            got = tuple(theirs[name].shape) if name in theirs else "missing"
            raise RuntimeError(f"{what}.{name}: TE module has {got}, the local layer {tuple(p.shape)}")
        theirs[name].copy_(p)
    extra = set(theirs) - {n for n, _ in old.named_parameters()}
    if extra:
        raise RuntimeError(f"{what}: TE module has parameters the local layer lacks: {sorted(extra)}")


def convert_to_te(policy: torch.nn.Module) -> list[str]:
    """Swap this stage's decoder linears and norms for TE modules in place; returns the swapped names.

    Call before building the optimizer (parameters are new objects). No collectives.
    """
    import transformer_engine.pytorch as te

    arch, state = policy.arch, policy.state
    grp: dist.ProcessGroup = state.tp_group
    cfg = te_layer_config(arch, tp=state.tp, dtype=policy.dtype)
    column, row = _te_classes()
    h = arch.hidden_size
    done: list[str] = []
    for lid, layer in policy.layers.items():
        new = {
            ("attn", "qkv"): column(h, arch.q_size + 2 * arch.kv_size, config=cfg, init_method=_no_init,
                                    gather_output=False, bias=arch.qkv_bias, skip_bias_add=False, is_expert=False,
                                    tp_comm_buffer_name="qkv", tp_group=grp),
            ("attn", "proj"): row(arch.q_size, h, config=cfg, init_method=_no_init, bias=False,
                                  input_is_parallel=True, skip_bias_add=False, is_expert=False,
                                  tp_comm_buffer_name="proj", tp_group=grp),
            ("mlp", "gate_up"): column(h, 2 * arch.intermediate_size, config=cfg, init_method=_no_init,
                                       gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                                       tp_comm_buffer_name="fc1", tp_group=grp),
            ("mlp", "down"): row(arch.intermediate_size, h, config=cfg, init_method=_no_init, bias=False,
                                 input_is_parallel=True, skip_bias_add=False, is_expert=False,
                                 tp_comm_buffer_name="fc2", tp_group=grp),
        }
        for norm in ("input_norm", "post_norm"):
            new[(None, norm)] = te.RMSNorm(h, eps=arch.rms_norm_eps, params_dtype=policy.dtype,
                                          device=state.device)
        for (parent_name, child), mod in new.items():
            parent = layer if parent_name is None else getattr(layer, parent_name)
            what = f"layers.{lid}." + (f"{parent_name}.{child}" if parent_name else child)
            _copy_params(getattr(parent, child), mod, what)
            setattr(parent, child, mod)
            done.append(what)
    return done
