"""Rotary position embeddings (RoPE) with the checkpoint's theta and scaling.

Half-split rotation as in the HF Llama/Qwen2 code (`rotate_half`: the first
and second halves of each head are the pair), not the interleaved form of the
original RoFormer paper. Frequencies follow Su et al. 2021 (RoFormer); the
`linear` type divides positions by `factor` (kaiokendev's position
interpolation); `llama3` rescales low frequencies and smooths the middle band
(Meta Llama 3.1 report / reference code). Angles are computed in fp32.
"""
from __future__ import annotations

import math

import torch

from megaent.model.arch import ModelArch
from megaent.model.fused import rope


def inv_frequencies(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies [D/2] fp32 for `arch.rope_type`, D = head_dim."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = arch.rope_scaling
    if arch.rope_type == "linear":
        return inv / sc["factor"]
    if arch.rope_type == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths (low frequencies) are interpolated by `factor`, short ones kept,
        # and the band between is blended linearly in old_len / wavelen.
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] long -> (cos, sin) each [B, S, D] in `dtype` (angles in fp32)."""
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, S, D] (N heads), cos/sin [B, S, D] -> rotated x [B, N, S, D]."""
    return rope(x, cos[:, None], sin[:, None])  # x * cos + rotate_half(x) * sin, in two passes
