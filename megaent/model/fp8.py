"""FP8 training: Transformer Engine recipes, and torchao float8 on the local megatron layers as the fallback.

Two routes, chosen by `megaent.model.backends.apply_backend`:
- backend=te: TE's linears quantise inside `fp8_autocast(fp8_recipe=...)`; `te_recipe` maps
  `model.fp8_recipe` to TE's recipe classes (transformer_engine.common.recipe): `delayed` ->
  DelayedScaling (HYBRID: E4M3 forward, E5M2 gradients; scale from an amax history), `current` ->
  Float8CurrentScaling (per-tensor scale from the tensor itself), `mxfp8` -> MXFP8BlockScaling (E4M3 with
  one scale per 32 values; Blackwell sm_100+ only). `te_fp8_context` returns the context factory the
  Policy wraps around its decoder layers; the amax reduction group is tp_group (Megatron-LM's
  `tp_only_amax_red` choice): pipeline stages hold different layers, so a world-wide amax reduction
  would mismatch buffers between stages.
- backend=local: torchao float8 training (dynamic per-tensor scaling, E4M3 forward / E5M2 gradients, the
  recipe torchao calls "tensorwise") replaces the matmul inside each decoder linear of megatron-core
  (`ColumnParallelLinear` / `RowParallelLinear`), keeping megatron's TP communication around it. torchao
  swaps only `torch.nn.Linear`, so each megatron linear gets a `Float8Linear` built by torchao's public
  `convert_to_float8_training` on a stand-in `nn.Linear` that shares the megatron weight Parameter.
In both routes the parameters stay in the model dtype (bf16/fp32): they are the master weights, so
`save_hf` and rollout weight sync export BF16/FP32 tensors and never FP8. The LM head and embedding stay in
high precision (log-probs and entropy are what the RL loss reads).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

FP8_RECIPES = ("delayed", "current", "mxfp8")
FP8_DIM_MULTIPLE = 16
"""FP8 GEMMs (cuBLASLt `_scaled_mm`, TE) need both matrix dims of a weight to be multiples of 16."""


def te_recipe(name: str) -> Any:
    """TE recipe object for `model.fp8_recipe` = name (needs transformer_engine)."""
    from transformer_engine.common import recipe as te_r

    if name == "delayed":
        # amax over the last 1024 steps, max: TE's and Megatron-LM's defaults for pre-training.
        return te_r.DelayedScaling(fp8_format=te_r.Format.HYBRID, amax_history_len=1024, amax_compute_algo="max")
    if name == "current":
        return te_r.Float8CurrentScaling(fp8_format=te_r.Format.HYBRID)
    if name == "mxfp8":
        return te_r.MXFP8BlockScaling(fp8_format=te_r.Format.E4M3)
    raise ValueError(f"model.fp8_recipe={name!r}: choose one of {FP8_RECIPES}")


def te_fp8_context(recipe_name: str, *, group: Optional[dist.ProcessGroup]) -> Callable[[], ContextManager]:
    """A factory of `fp8_autocast(enabled=True, fp8_recipe=..., fp8_group=group)` contexts.

    Collectives: with the delayed recipe TE all-reduces the amax history over `group` when the context exits
    (forward) and after backward; none for `current` / `mxfp8`.
    """
    import transformer_engine.pytorch as te

    recipe = te_recipe(recipe_name)

    def ctx() -> ContextManager:
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)

    return ctx


def autocast_context(device_type: str, dtype: torch.dtype) -> Callable[[], ContextManager]:
    """precision=bf16 over fp32 parameters: `torch.autocast(device_type, dtype)` around the decoder layers."""
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def nullcontext_factory() -> ContextManager:
    return contextlib.nullcontext()


# ---- torchao fallback ------------------------------------------------------------------------------------------

class _Float8ForwardImpl:
    """Replaces a megatron linear's `_forward_impl(input, weight, bias, ...)` with a torchao float8 matmul.

    Communication stays megatron's: a column-parallel layer with TP > 1 passes `allreduce_dgrad=True`
    (its input gradient must be summed over tp_group), done here by `copy_to_tensor_model_parallel_region`
    (identity forward, 1 all-reduce on tp_group backward); the row-parallel all-reduce of the output runs
    after this call inside megatron's `forward`. Sequence parallel is not supported on this route.
    """

    def __init__(self, layer: torch.nn.Module, config: Any) -> None:
        from torchao.float8 import convert_to_float8_training

        out_f, in_f = layer.weight.shape
        stand_in = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        stand_in.weight = layer.weight  # the same Parameter: optimizer, checkpoints and export see one tensor
        holder = torch.nn.Sequential(stand_in)
        convert_to_float8_training(holder, config=config)
        self.f8 = holder[0]  # kept outside the module tree: no duplicate parameter names
        self.tp_group = layer.tp_group

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,  # noqa: A002
                 allreduce_dgrad: bool = False, sequence_parallel: bool = False, **_: Any) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        if sequence_parallel:
            raise NotImplementedError("torchao float8 on megatron layers does not support sequence parallel; "
                                      "use model.backend=te for FP8 with sequence parallel")
        assert weight is self.f8.weight, "float8 forward got a weight other than the layer's own"
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=self.tp_group)  # noqa: A001
        out = self.f8(input)
        return out if bias is None else out + bias.to(out.dtype)


def float8_eligible(layer: torch.nn.Module) -> bool:
    """A weight [out, in] whose dims are both multiples of FP8_DIM_MULTIPLE (the FP8 GEMM constraint)."""
    w = getattr(layer, "weight", None)
    return w is not None and w.dim() == 2 and all(d % FP8_DIM_MULTIPLE == 0 for d in w.shape)


def convert_decoder_to_float8(layers: torch.nn.Module, *, config: Any = None) -> list[str]:
    """torchao float8 on every megatron TP linear under `layers` (the decoder layers, not the head).

    Returns the names converted; linears with dims not a multiple of 16 stay in high precision (logged).
    Parameters, names and dtypes are unchanged. config: a `torchao.float8.Float8LinearConfig`
    (default: tensorwise dynamic scaling).
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torchao.float8 import Float8LinearConfig

    config = config or Float8LinearConfig()
    done, skipped = [], []
    for name, mod in layers.named_modules():
        if not isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            continue
        if not float8_eligible(mod):
            skipped.append(name)
            continue
        mod._forward_impl = _Float8ForwardImpl(mod, config)
        done.append(name)
    if skipped:
        log.info("float8: %d linears keep high precision (dims not multiples of %d): %s", len(skipped),
                 FP8_DIM_MULTIPLE, ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))
    return done
