"""The rollout engine protocol the trainer talks to, and helpers shared by engines.

Three engines implement it: `EmbeddedEngine` (in-process, on the megaent
Policy), `SGLangClient` (HTTP to `megaent serve` or SGLang servers) and, through
the client, SGLang servers started by `launcher.launch_sglang`.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

from megaent.rollout.types import RolloutError, Sample, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    """generate(prompts, params) -> samples[i][j], the j-th of `params.n` samples of prompt i."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        ...


def check_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: Optional[int] = None,
                  name: str = "prompts") -> list[list[int]]:
    """Validate token-id prompts; returns them as lists of int. Raises RolloutError naming the bad entry."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise RolloutError(f"{name}: expected a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise RolloutError(f"{name}[{i}]: expected a non-empty list of token ids, got {p!r:.80}")
        ids = []
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bound = f" < vocab size {vocab_size}" if vocab_size is not None else ""
                raise RolloutError(f"{name}[{i}]: token id {t!r} is not an integer in [0{bound})")
            ids.append(int(t))
        out.append(ids)
    return out


def logprob_consistency(trainer_logprobs: Sequence[Sequence[float]], rollout_logprobs: Sequence[Sequence[float]]
                        ) -> dict[str, float]:
    """Mean / max |trainer - rollout| log-prob over the same tokens (a train/inference mismatch metric).

    Inputs are per-sample lists (same lengths pairwise); returns
    {"rollout/logprob_abs_diff_mean", "rollout/logprob_abs_diff_max", "rollout/logprob_tokens"}.
    """
    import torch

    if len(trainer_logprobs) != len(rollout_logprobs):
        raise ValueError(f"{len(trainer_logprobs)} trainer samples vs {len(rollout_logprobs)} rollout samples")
    diffs = []
    for i, (a, b) in enumerate(zip(trainer_logprobs, rollout_logprobs)):
        a_t = torch.as_tensor(a, dtype=torch.float64).flatten()
        b_t = torch.as_tensor(b, dtype=torch.float64).flatten()
        if a_t.numel() != b_t.numel():
            raise ValueError(f"sample {i}: {a_t.numel()} trainer log-probs vs {b_t.numel()} rollout log-probs")
        diffs.append((a_t - b_t).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    return {"rollout/logprob_abs_diff_mean": float(d.mean()) if d.numel() else 0.0,
            "rollout/logprob_abs_diff_max": float(d.max()) if d.numel() else 0.0,
            "rollout/logprob_tokens": float(d.numel())}
