"""Optional NVIDIA apex kernels: fused Adam and fused RMSNorm on CUDA. Never required.

- `adamw_kernel(device)` picks, with one log line: apex `FusedAdam(adam_w_mode=True)` (one multi-tensor
  kernel launch per step) when apex's CUDA extension imports and the parameters are on CUDA; else
  `torch.optim.AdamW(fused=True)` on CUDA; else plain `torch.optim.AdamW` (the CPU path, unchanged).
  All three implement AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with the same hyper-
  parameters; their state dicts differ, so resume with the same kernel.
- `convert_norms_to_apex(policy)` swaps the decoder's RMSNorms for apex `FusedRMSNorm` (parameter name
  `weight`, so names and checkpoints are unchanged).
`pip install apex` from PyPI installs an unrelated web toolkit; NVIDIA apex is built from source
(github.com/NVIDIA/apex). The checks below therefore import `apex.optimizers.FusedAdam`, not just `apex`.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

log = logging.getLogger(__name__)


def apex_fused_adam() -> Optional[type]:
    """apex.optimizers.FusedAdam when NVIDIA apex with its CUDA extensions is importable, else None."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:  # ImportError, or the unrelated PyPI `apex`, or a build without CUDA extensions
        return None
    return FusedAdam


def apex_fused_rms_norm() -> Optional[type]:
    """apex.normalization.FusedRMSNorm when importable, else None."""
    try:
        from apex.normalization import FusedRMSNorm  # type: ignore[import-not-found]
    except Exception:
        return None
    return FusedRMSNorm


def adamw_kernel(device: torch.device, *, use_apex: bool = True) -> str:
    """"apex" | "torch_fused" | "torch": the AdamW implementation for parameters on `device`."""
    if device.type != "cuda":
        return "torch"
    if use_apex and apex_fused_adam() is not None:
        return "apex"
    return "torch_fused"


def build_adamw(groups: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float,
                kernel: str) -> torch.optim.Optimizer:
    """AdamW over param `groups` (each with its own weight_decay) with the `adamw_kernel` result."""
    groups = list(groups)
    if kernel == "apex":
        fused = apex_fused_adam()
        if fused is None:
            raise RuntimeError("AdamW kernel 'apex' asked for, but apex.optimizers.FusedAdam does not import; "
                               "build NVIDIA apex with --cuda_ext or let the kernel be chosen automatically")
        return fused(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if kernel == "torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    if kernel == "torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"AdamW kernel {kernel!r}: choose apex, torch_fused or torch")


@torch.no_grad()
def convert_norms_to_apex(policy: torch.nn.Module) -> list[str]:
    """Swap every decoder-layer RMSNorm (input_norm, post_norm) for apex FusedRMSNorm; returns the names.

    Needs apex (`apex_fused_rms_norm() is not None`) and CUDA parameters. No collectives.
    """
    fused = apex_fused_rms_norm()
    if fused is None:
        raise RuntimeError("apex.normalization.FusedRMSNorm does not import; build NVIDIA apex with --cuda_ext")
    done = []
    for lid, layer in policy.layers.items():
        for name in ("input_norm", "post_norm"):
            old = getattr(layer, name)
            new = fused(old.weight.shape[0], eps=old.eps, elementwise_affine=True).to(old.weight.device,
                                                                                   old.weight.dtype)
            new.weight.copy_(old.weight)
            setattr(layer, name, new)
            done.append(f"layers.{lid}.{name}")
    return done
