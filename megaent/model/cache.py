"""Preallocated key/value cache for incremental decoding on one pipeline stage.

Holds K and V for this rank's layers and local KV heads only (KVl = KV heads / TP, 1 when TP > KV heads),
each [B, KVl, max_len, D]. `Policy.forward(..., kv_cache=cache)` writes the new
tokens at positions [length, length + S) of every layer and then advances
`length` by S once all local layers have run. Inference only: writes are
in-place, so run it under `torch.no_grad()`.

Batched sampling with left-padded prompts: pass `attention_mask [B, length + S]`
(True = real token) so pad keys are never attended, and `position_ids` that count
only real tokens (e.g. `mask.cumsum(-1) - 1`); see `Policy.forward`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from megaent.model.arch import ModelArch


class DecoderStage(Protocol):
    """What a cache is sized from: a `megaent.model.policy.Policy` stage (named here, not imported, so this
    module stays below both `layers` and `policy`, which import `KVCache`)."""

    arch: ModelArch
    state: Any  # megaent.parallel.ParallelState (tp, device)
    layers: Any  # this stage's decoder layers (len = local layer count)
    dtype: torch.dtype


@dataclass
class KVCache:
    """Per-layer K/V buffers [B, KVl, max_len, D] and the number of filled positions."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KVl, S, D] of local layer `slot` at [length, length+S); return K, V [B, KVl, length+S, D]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, max_len={self.max_len}; allocate a "
                             f"larger cache (new_kv_cache(..., max_len=prompt + max new tokens))")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache holds batch {self.batch_size}, got a batch of {k.shape[0]}")
        self.keys[slot][:, :, self.length:end] = k
        self.values[slot][:, :, self.length:end] = v
        return self.keys[slot][:, :, :end], self.values[slot][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def select_(self, batch_index: torch.Tensor) -> None:
        """Keep only rows `batch_index` [B'] (long) of every buffer, e.g. to drop finished samples."""
        self.keys = [k.index_select(0, batch_index) for k in self.keys]
        self.values = [v.index_select(0, batch_index) for v in self.values]


def new_kv_cache(policy: DecoderStage, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None
                 ) -> KVCache:
    """An empty cache for the local stage of `policy`: one [B, KVl, max_len, D] K and V per local layer."""
    dtype = dtype or policy.dtype
    kvl = policy.arch.local_kv_heads(policy.state.tp)
    shape = (batch_size, kvl, max_len, policy.arch.head_dim)
    n = len(policy.layers)
    device = policy.state.device
    return KVCache(keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])
