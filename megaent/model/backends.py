"""Layer backends and precisions: what each needs, and one clear error when it is missing.

The trainer's policy is megatron-core's GPTModel (`megaent.model.gpt_policy.GPTPolicy`): there the backend
picks the layer spec (local, or Transformer Engine with `model.backend=te`), FP8 is megatron-core's own
`TransformerConfig` fp8 settings, recompute is megatron-core's `recompute_granularity`, and the gradient
reduce (fp32 main grads, bucketed, overlapped with backward) is megatron-core's DDP. `check_backend` runs
before anything is built and names what to install or change.

`apply_backend` serves megaent's own inference decoder (`megaent.model.policy.Policy`, the embedded rollout
engine and `megaent serve`), not the training update:
- backend=local, precision=fp32|bf16: megatron-core local TP layers; bf16 over fp32 parameters runs the
  decoder layers under `torch.autocast("cuda", bf16)` on GPU.
- backend=te: Transformer Engine linears and norms (`megaent.model.te_layers`; CUDA with `megaent[gpu]`).
- precision=fp8: with backend=te, TE's autocast with `model.fp8_recipe`; with backend=local, torchao
  float8 on the decoder linears (`megaent.model.fp8`). Needs an FP8 GPU (sm_89+; mxfp8 sm_100+).
- activation_checkpointing: `full` recomputes whole decoder layers; `selective` only the core attention.
- apex (`model.apex=auto`): fused RMSNorm on the local backend on CUDA when apex imports.
- compile: `torch.compile` of each decoder layer (not with backend=te).
It returns what it did, for one log line.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A backend/precision the machine cannot run; the message says what to install or change."""


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    return torch.cuda.is_available()


def fp8_route(*, backend: str, precision: str) -> str:
    """"te" | "torchao" | "none": which library runs FP8 for this backend/precision (no checks)."""
    if precision != "fp8":
        return "none"
    return "te" if backend == "te" else "torchao"


def check_backend(*, backend: str, precision: str, fp8_recipe: str = "delayed",
                  activation_checkpointing: str = "none") -> None:
    """Raise BackendError naming the key, the value and what to install / change; return if runnable."""
    if backend == "te":
        if not _cuda():
            raise BackendError("model.backend=te needs a CUDA GPU with Transformer Engine; on CPU use "
                               "model.backend=local")
        if not has_module("transformer_engine"):
            raise BackendError("model.backend=te needs Transformer Engine: pip install 'megaent[gpu]' "
                               "(transformer-engine[pytorch]) on the GPU node, or use model.backend=local")
    if precision != "fp8":
        return
    if backend == "te" and activation_checkpointing == "full":
        raise BackendError("model.activation_checkpointing=full with model.backend=te and model.precision=fp8: "
                           "torch's recompute runs outside fp8_autocast (TE needs its own checkpoint); use "
                           "model.activation_checkpointing=selective")
    if not _cuda():
        raise BackendError("model.precision=fp8 needs an FP8-capable CUDA GPU (H100 or newer) with "
                           "Transformer Engine or torchao; on CPU use model.precision=fp32")
    if not (has_module("transformer_engine") or has_module("torchao")):
        raise BackendError("model.precision=fp8 needs Transformer Engine (pip install 'megaent[gpu]') or "
                           "torchao (pip install torchao) for float8 training")
    if backend == "local" and not has_module("torchao"):
        raise BackendError("model.precision=fp8 with model.backend=local runs torchao float8: pip install "
                           "torchao, or set model.backend=te to use Transformer Engine")
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        raise BackendError(f"model.precision=fp8 needs FP8 tensor cores (sm_89 / sm_90 or newer); this GPU is "
                           f"sm_{cap[0]}{cap[1]}: use model.precision=bf16")
    if fp8_recipe == "mxfp8":
        if backend != "te":
            raise BackendError("model.fp8_recipe=mxfp8 needs model.backend=te (torchao's MX formats are not "
                               "wired here); or use model.fp8_recipe=current")
        if cap < (10, 0):
            raise BackendError(f"model.fp8_recipe=mxfp8 needs a Blackwell GPU (sm_100+); this GPU is "
                               f"sm_{cap[0]}{cap[1]}: use model.fp8_recipe=delayed or current")


def set_selective_recompute(policy: torch.nn.Module, on: bool = True) -> int:
    """Mark every local decoder layer's core attention for recomputation in backward; returns the count."""
    for layer in policy.layers.values():
        layer.attn.recompute_core = on
    return len(policy.layers)


def apply_backend(policy: torch.nn.Module, *, backend: str = "local", precision: str = "fp32",
                  fp8_recipe: str = "delayed", activation_checkpointing: str = "none", apex: str = "auto",
                  compile: bool = False) -> dict[str, Any]:  # noqa: A002 (the config key's name)
    """Make a freshly loaded local `Policy` the configured one, in place; returns {what: how} for logging.

    Order: layer swap (te / apex norms), recompute marks, precision context or float8 conversion, compile.
    Parameters keep their names, shapes and dtype (the master weights that rollout export reads).
    With the defaults (local, fp32, none, compile off) on CPU nothing changes.
    """
    check_backend(backend=backend, precision=precision, fp8_recipe=fp8_recipe,
                  activation_checkpointing=activation_checkpointing)
    done: dict[str, Any] = {"backend": backend, "precision": precision}
    on_cuda = policy.state.device.type == "cuda"
    if backend == "te":
        from megaent.model.te_layers import convert_to_te

        done["te_modules"] = len(convert_to_te(policy))
    elif apex == "auto" and on_cuda:
        from megaent.model.apex_ops import apex_fused_rms_norm, convert_norms_to_apex

        if apex_fused_rms_norm() is not None:
            done["apex_norms"] = len(convert_norms_to_apex(policy))
    policy.activation_checkpointing = activation_checkpointing == "full"
    if activation_checkpointing == "selective":
        done["selective_recompute_layers"] = set_selective_recompute(policy)
    route = fp8_route(backend=backend, precision=precision)
    if route == "te":
        from megaent.model.fp8 import te_fp8_context

        policy.compute_context = te_fp8_context(fp8_recipe, group=policy.state.tp_group)
        done["fp8"] = f"transformer_engine:{fp8_recipe}"
    elif route == "torchao":
        from megaent.model.fp8 import convert_decoder_to_float8

        if fp8_recipe != "current":
            log.info("model.fp8_recipe=%s: torchao float8 uses dynamic per-tensor (current) scaling", fp8_recipe)
        done["fp8"] = f"torchao:{len(convert_decoder_to_float8(policy.layers))}_linears"
    elif precision == "bf16" and policy.dtype == torch.float32:
        if on_cuda:
            from megaent.model.fp8 import autocast_context

            policy.compute_context = autocast_context("cuda", torch.bfloat16)
            done["autocast"] = "bf16"
        else:  # megatron's linears re-enter autocast in backward for CUDA only: bf16 grads meet fp32 weights
            log.info("model.precision=bf16 with model.dtype=float32 on CPU computes in fp32; set "
                     "model.dtype=bfloat16 for bf16 compute")
    if compile:
        if backend == "te":
            log.info("model.compile=true is skipped with model.backend=te (TE kernels are fused already)")
        else:
            for layer in policy.layers.values():
                layer.compile(dynamic=True)
            done["compiled_layers"] = len(policy.layers)
    return done
