"""What a rollout engine takes and gives back: `SamplingParams`, `Sample`, `RolloutError`.

Log-prob semantics (the one choice that matters to the trainer): `Sample.logprobs[i]`
is log softmax(logits / temperature) of the sampled token over the FULL vocabulary,
in fp32, i.e. before top-p / top-k truncation (temperature 0 = greedy uses
temperature 1). That is what the trainer recomputes from its own forward, so the
ratio pi_new / pi_old starts at 1 when the weights agree. It is also SGLang's
default `meta_info.output_token_logprobs`: its sampler takes log(softmax(logits /
T)) before the top-k/top-p sampling kernel touches the distribution
(python/sglang/srt/layers/sampler.py); with SGLANG_RETURN_ORIGINAL_LOGPROB=1 SGLang
returns the log-probs BEFORE temperature instead, which only agrees with ours at
temperature 1. The truncated distribution the token was actually drawn from is not
what the policy-gradient estimator needs (see Cui et al. 2025, whose recipe uses
temperature 1 and no truncation, where all three coincide).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

FinishReason = Literal["stop", "length"]


class RolloutError(RuntimeError):
    """A rollout request that cannot be served (message says what to change)."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options of one generate call (field names follow SGLang's `sampling_params`)."""

    n: int = 1
    """Samples per prompt (the GRPO group size G)."""
    max_new_tokens: int = 64
    """Maximum generated tokens per sample."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus threshold in (0, 1]; 1 = off."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) = off."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a sample (kept as its last output token); EOS is added by the engine unless ignore_eos."""
    ignore_eos: bool = False
    """Do not stop on the tokenizer's EOS (stop_token_ids still stop)."""
    seed: Optional[int] = None
    """Sampling seed (SGLang `sampling_seed`); None = the engine's own running seed."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p x the most likely one (on softmax(logits / T)); 0 = off."""
    repetition_penalty: float = 1.0
    """In (0, 2]: logits of tokens already in the output are divided by it (multiplied when negative); 1 = off."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from a logit once per occurrence of its token in the output; 0 = off."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted from the logit of every token already in the output; 0 = off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits after the penalties (megaent.rollout.penalties)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(v)) for t, v in bias)))
        self.validate()

    def validate(self, *, prefix: str = "sampling_params") -> None:
        """Raise ValueError naming the field, its value and the fix."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{prefix}.n={self.n!r}: must be an integer >= 1")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{prefix}.max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not (self.temperature >= 0.0):
            raise ValueError(f"{prefix}.temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"{prefix}.top_p={self.top_p!r}: must be in (0, 1] (1 = off)")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"{prefix}.top_k={self.top_k!r}: must be an integer >= 1, or -1 / 0 for off")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"{prefix}.min_p={self.min_p!r}: must be in [0, 1] (0 = off)")
        if not (0.0 < self.repetition_penalty <= 2.0):
            raise ValueError(f"{prefix}.repetition_penalty={self.repetition_penalty!r}: must be in (0, 2] (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r}: must be in [-2, 2] (0 = off)")
        if any(t < 0 or not math.isfinite(v) for t, v in self.logit_bias):
            raise ValueError(f"{prefix}.logit_bias: token ids must be >= 0 and biases finite")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"{prefix}.stop_token_ids={list(self.stop_token_ids)}: token ids must be >= 0")


@dataclass
class Sample:
    """One generated continuation of one prompt.

    `output_ids` includes the stop token when `finish_reason == "stop"`;
    `logprobs[i]` is the fp32 log-prob of `output_ids[i]` (see the module docstring).
    """

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    matched_stop: Optional[int] = None
    """The stop token that ended the sample (None when finish_reason == "length")."""
    meta: dict = field(default_factory=dict)
    """Extra engine information (e.g. the server URL that produced it)."""

    def __post_init__(self) -> None:
        assert len(self.output_ids) == len(self.logprobs), "one log-prob per output token"
