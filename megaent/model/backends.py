"""Layer backends and precisions: what each needs, and one clear error when it is missing.

- backend=local, precision=fp32|bf16: megatron-core local TP layers; runs anywhere (bf16 on CPU is slow but
  correct).
- backend=te: Transformer Engine layers (GPU only; `pip install 'megaent[gpu]'` on a CUDA machine).
- precision=fp8: Transformer Engine FP8 recipes, or torchao float8 training as the fallback when TE is absent;
  both need an FP8-capable GPU (H100 / sm_89+).
The TE/FP8 layer path itself is not built yet in this tree: asking for it on a machine that has the packages
raises NotImplementedError saying so, rather than silently training in another precision.
"""
from __future__ import annotations

import importlib.util


class BackendError(RuntimeError):
    """A backend/precision the machine cannot run; the message says what to install or change."""


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_backend(*, backend: str, precision: str) -> None:
    """Raise BackendError (what to install / change) or NotImplementedError for paths not built yet."""
    if backend == "te":
        if not _cuda():
            raise BackendError("model.backend=te needs a CUDA GPU with Transformer Engine; on CPU use "
                               "model.backend=local")
        if not has_module("transformer_engine"):
            raise BackendError("model.backend=te needs Transformer Engine: pip install 'megaent[gpu]' "
                               "(transformer-engine[pytorch]) on the GPU node, or use model.backend=local")
    if precision == "fp8":
        if not _cuda():
            raise BackendError("model.precision=fp8 needs an FP8-capable CUDA GPU (H100 or newer) with "
                               "Transformer Engine or torchao; on CPU use model.precision=fp32")
        if not (has_module("transformer_engine") or has_module("torchao")):
            raise BackendError("model.precision=fp8 needs Transformer Engine (pip install 'megaent[gpu]') or "
                               "torchao (pip install torchao) for float8 training")
    if backend == "te" or precision == "fp8":
        raise NotImplementedError(f"model.backend={backend} / model.precision={precision}: the Transformer Engine"
                                  " / float8 layer path is not implemented yet; use model.backend=local with "
                                  "model.precision=bf16")
