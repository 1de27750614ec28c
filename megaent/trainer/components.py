"""Builders the trainer composes: policy directory (HF checkpoint or the demo's warmed tiny policy),
tokenizer, policy, prompt stream, reward scorer, and small helpers. Each takes only its config section.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megaent.config import Config, ConfigError, DataConfig, ModelConfig, RewardConfig
from megaent.parallel import ParallelState

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (trainer.seed, step, ...): stable across runs and platforms."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & ((1 << 62) - 1)
    return h


def cache_dir() -> Path:
    return Path(os.environ.get("MEGAENT_CACHE", Path.home() / ".cache" / "megaent"))


def prepare_policy_dir(cfg: Config, *, run_dir: Path, state: ParallelState) -> Path:
    """The HF directory the policy starts from: `model.path`, or the demo's tiny policy warmed on the task."""
    if cfg.model.path:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.model.path!r}: no config.json there; point it at a HuggingFace "
                              "checkpoint directory (or leave it empty for the demo's own tiny policy)")
        return path
    from megaent.data.warmup import warmup_policy

    out = cache_dir() / f"demo-{cfg.data.task}-seed{cfg.trainer.seed}"
    if state.rank == 0:
        log.info("demo: warming a tiny policy on the %r task (cached in %s)", cfg.data.task, out)
        warmup_policy(out, task=cfg.data.task, seed=cfg.trainer.seed)
    if state.world_size > 1:
        dist.barrier()
    return out


def load_tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def eos_ids(tokenizer: Any, hf_dir: Path) -> list[int]:
    from megaent.rollout.embedded import read_eos_ids

    ids = list(read_eos_ids(hf_dir))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def check_backend(cfg: ModelConfig) -> None:
    """GPU-only choices fail here with what to install, before anything is built."""
    from megaent.model.backends import check_backend as _check

    _check(backend=cfg.backend, precision=cfg.precision)


def load_policy(cfg: ModelConfig, hf_dir: Path, *, state: ParallelState) -> Any:
    from megaent.model import load_hf

    check_backend(cfg)
    return load_hf(str(hf_dir), state, dtype=_DTYPES[cfg.dtype], pipeline_layers=cfg.pipeline_layers)


def export_hf(policy: Any, state: ParallelState, out: Path) -> Path:
    from megaent.model import save_hf

    return Path(save_hf(policy, state, out))


@dataclass
class Prompt:
    ids: list[int]
    text: str
    answer: str
