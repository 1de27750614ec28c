"""Builders the trainer composes: policy directory (HF checkpoint or the demo's warmed tiny policy),
tokenizer, policy, prompt stream, reward scorer, and small helpers. Each takes only its config section.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megaent.config import Config, ConfigError, DataConfig, ModelConfig, RewardConfig
from megaent.config.schema import OptimizerConfig
from megaent.parallel import ParallelState

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "mxfp8": "mxfp8"}  # megatron-core's names


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

    from megaent.rewards.synthetic import TASKS

    if cfg.data.task not in TASKS:
        raise ConfigError(f"data.task={cfg.data.task!r}: unknown synthetic task; choose one of "
                          f"{sorted(TASKS)} or set model.path to a HF checkpoint")
    out = demo_policy_dir(cfg.data.task, cfg.trainer.seed, digits=cfg.data.task_max_digits,
                          steps=cfg.model.demo_warmup_steps)
    if state.rank == 0:
        log.info("demo: warming a tiny policy on the %r task (cached in %s)", cfg.data.task, out)
        warmup_policy(out, seed=cfg.trainer.seed, steps=cfg.model.demo_warmup_steps,
                      max_digits=cfg.data.task_max_digits)
    if state.world_size > 1:
        dist.barrier()
    return out


def _warmup_version() -> str:
    """A short hash of the warm-up's default arguments: a changed recipe gets a fresh cache entry."""
    import hashlib
    import inspect

    from megaent.data.warmup import warmup_policy

    sig = inspect.signature(warmup_policy)
    text = repr(sorted((k, v.default) for k, v in sig.parameters.items() if v.default is not inspect.Parameter.empty))
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def demo_policy_dir(task: str, seed: int, *, digits: int, steps: int) -> Path:
    """Where the demo's warmed policy for (task, seed, digits, steps) is cached."""
    return cache_dir() / f"demo-{task}{digits}-seed{seed}-steps{steps}-{_warmup_version()}"


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

    _check(backend=cfg.backend, precision=cfg.precision, fp8_recipe=cfg.fp8_recipe,
           activation_checkpointing=cfg.activation_checkpointing)


def load_policy(cfg: ModelConfig, hf_dir: Path, *, state: ParallelState) -> Any:
    """The training policy: megatron-core `GPTModel` (`megaent.model.gpt_policy.GPTPolicy`) from the HF dir.

    model.dtype is the parameters' dtype (bfloat16: megatron-core's mixed precision, fp32 main gradients and
    main parameters in the optimizer); model.backend picks the layer spec (local / Transformer Engine);
    precision=fp8 sets megatron-core's fp8 settings (TE spec, `model.fp8_recipe`); activation_checkpointing is
    megatron-core's recompute granularity. Sequence parallelism is on whenever TP > 1."""
    from megaent.model import load_hf

    check_backend(cfg)
    if cfg.compile:
        raise ConfigError("model.compile=true: torch.compile of megatron-core's layers is not supported; "
                          "set model.compile=false (the TE spec brings fused kernels on GPUs)")
    dtype = torch.bfloat16 if cfg.precision in ("bf16", "fp8") else _DTYPES[cfg.dtype]
    policy = load_hf(str(hf_dir), state, dtype=dtype, pipeline_layers=cfg.pipeline_layers, engine="mcore",
                     backend=cfg.backend, recompute=cfg.activation_checkpointing,
                     fp8=_FP8_RECIPES[cfg.fp8_recipe] if cfg.precision == "fp8" else None)
    if state.rank == 0:
        log.info("policy: megatron-core GPTModel, backend=%s, params %s, recompute=%s, sequence_parallel=%s",
                 cfg.backend, str(dtype).replace("torch.", ""), cfg.activation_checkpointing,
                 policy.config.sequence_parallel)
    return policy


def build_engine(policy: Any, cfg: OptimizerConfig, *, state: ParallelState) -> Any:
    """megatron-core DDP + optimizer around the policy (`megaent.trainer.mcore_engine.build_engine`)."""
    from megaent.trainer.mcore_engine import build_engine as _build

    return _build(policy, state, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                  eps=cfg.eps, clip_grad=cfg.grad_clip, distributed_optimizer=cfg.distributed_optimizer)


def export_hf(policy: Any, state: ParallelState, out: Path) -> Path:
    from megaent.model import save_hf

    return Path(save_hf(policy, state, out))


HELD_OUT_SEED = 1_000_003  # RL draws synthetic problems from another stream than the warm-up trained on


def build_prompts(cfg: DataConfig, tokenizer: Any, *, seed: int, batch_size: int, cap: bool = False) -> Any:
    """Prompt stream (`next_batch()`, `state_dict()`): the synthetic task when data.path is empty, else the
    jsonl/parquet dataset, shuffled deterministically from trainer.seed with an exact resume position.
    cap: a batch larger than the dataset becomes the whole dataset (evaluation) instead of an error."""
    from megaent.data.loader import PromptLoader
    from megaent.data.prompts import DataError
    from megaent.data.prompts import build_prompts as build_dataset

    try:
        # The offset only moves the synthetic task's problem stream (a file ignores the seed).
        ds = build_dataset(cfg, tokenizer=tokenizer, seed=seed + HELD_OUT_SEED)
        return PromptLoader(ds, batch_size=min(batch_size, len(ds)) if cap else batch_size, seed=seed,
                            shuffle=cfg.shuffle)
    except (DataError, ValueError) as exc:  # missing file, malformed rows, too few prompts: the user's data to fix
        raise ConfigError(str(exc)) from None


class Scorer:
    """Rank-0 reward scoring: `score(texts, answers) -> (rewards, timeouts)`."""

    def __init__(self, cfg: RewardConfig) -> None:
        from megaent.rewards.pool import RewardPool

        # Exact-match synthetic rewards are microseconds and cannot hang: score in-process, no worker processes.
        workers = 0 if cfg.kind == "synthetic" else cfg.workers
        self.pool = RewardPool(cfg.kind, workers=workers, timeout_s=cfg.timeout_s, format_reward=cfg.format_reward,
                               memory_gib=cfg.worker_memory_gib)

    def score(self, texts: list[str], answers: list[str]) -> tuple[list[float], int]:
        res = self.pool.score(texts, answers)
        return list(res.rewards), int(res.timeouts)

    def take_metrics(self) -> dict[str, float]:
        """Verifier timeouts, errors and crashes since the last call (the step's reward/verifier_* metrics)."""
        return self.pool.take_metrics()

    def close(self) -> None:
        self.pool.close()


def build_scorer(cfg: RewardConfig, data: DataConfig) -> Scorer:
    del data
    return Scorer(cfg)


def build_entropy_controller(cfg: Config) -> Optional[Any]:
    """The entropy controller of `algorithm.target_entropy` (None when it is null), starting at the configured
    KL-Cov k / Clip-Cov r; its bounds, gains and schedule from the `algorithm.entropy_controller_*` keys."""
    a = cfg.algorithm
    if a.target_entropy is None:
        return None
    from megaent.algorithms.entropy_controller import EntropyController

    knob = "kl_cov_ratio" if a.policy_loss == "kl_cov" else "clip_cov_ratio"
    return EntropyController(ratio=getattr(a, knob), target=a.target_entropy, final=a.target_entropy_final,
                             schedule=a.target_entropy_schedule, total_steps=cfg.trainer.steps,
                             ratio_min=a.entropy_controller_ratio_min, ratio_max=a.entropy_controller_ratio_max,
                             ki=a.entropy_controller_ki, kp=a.entropy_controller_kp, knob=knob)


def controlled_loss(loss_cfg: Any, controller: Optional[Any]) -> Any:
    """`loss_cfg` with the controller's current k / r in place of the configured one (unchanged without one)."""
    import dataclasses

    if controller is None:
        return loss_cfg
    return dataclasses.replace(loss_cfg, **{controller.knob: controller.ratio})
