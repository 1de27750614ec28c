"""SGLang's logit penalties and `logit_bias`, batched per row on the logits' device: `PenaltyRows`.

Semantics of SGLang 0.5.23 (python/sglang/srt/sampling/penaltylib/*.py and
sampling_batch_info.py `apply_logits_bias`), with c[b, v] = how often token v
occurs in row b's OUTPUT so far:

- frequency: logits -= frequency_penalty * c;
- presence: logits -= presence_penalty * (c > 0);
- repetition (Keskar et al. 2019, CTRL, eq. 1 as implemented by HF / SGLang):
  where c > 0, a negative logit is multiplied by the penalty, any other divided;
- then logit_bias is added; temperature and min_p follow in `sampling.sample_next`.

Two choices worth knowing:
- only output tokens count. SGLang's penalizers only ever cumulate output
  tokens (`_cumulate_output_tokens`); HF's `RepetitionPenaltyLogitsProcessor`
  and vLLM also count the prompt. We follow SGLang, the server we stand in for.
- additive penalties come before the repetition scaling, the order of SGLang's
  default (overlap-scheduler) path (`update_penalties`: additive sums, then
  `apply_scaling_penalties`); its non-overlap path iterates a set, so its order
  is not defined there.

The log-prob the engine returns for a token is taken after these transforms
(SGLang samples from, and reports log-probs of, the penalised logits); min_p,
like top-p / top-k, only restricts which tokens can be drawn.

State is dense, like SGLang's `cumulated_*` tensors: counts [B, V] fp32 (B x V
x 4 bytes, built only when some row of a batch uses a penalty), updated with
one scatter-add per decode step, no Python loop over rows or vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

NEUTRAL = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, *, repetition: torch.Tensor,
                    frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32, counts [B, V] fp32 (output occurrences), repetition / frequency / presence [B] fp32
    -> penalised logits [B, V] fp32 (a new tensor). No collectives."""
    seen = counts > 0
    out = logits - frequency.unsqueeze(-1) * counts - presence.unsqueeze(-1) * seen
    scale = torch.where(seen, repetition.unsqueeze(-1), torch.ones_like(out))
    return torch.where(out < 0, out * scale, out / scale)


def dense_bias(biases: Sequence[Optional[Mapping[int, float]]], vocab_size: int, device: torch.device
               ) -> Optional[torch.Tensor]:
    """One {token id: bias} map (or None) per row -> bias [B, V] fp32 on `device`, None when every map is empty."""
    rows, cols, vals = [], [], []
    for b, m in enumerate(biases):
        for t, v in (m or {}).items():
            rows.append(b)
            cols.append(int(t))
            vals.append(float(v))
    if not rows:
        return None
    out = torch.zeros(len(biases), vocab_size, dtype=torch.float32)
    out[torch.tensor(rows), torch.tensor(cols)] = torch.tensor(vals, dtype=torch.float32)  # a map: ids unique
    return out.to(device)


@dataclass
class PenaltyRows:
    """Per-row penalty state of one decode batch (tensors [B] unless noted, all on the logits' device)."""

    counts: torch.Tensor  # [B, V] fp32: output occurrences so far
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    bias: Optional[torch.Tensor]  # [B, V] fp32 or None
    penalise: bool  # some row has a non-neutral penalty (else only the bias applies)

    @classmethod
    def build(cls, *, repetition: Sequence[float], frequency: Sequence[float], presence: Sequence[float],
              logit_bias: Sequence[Optional[Mapping[int, float]]], vocab_size: int, device: torch.device
              ) -> Optional["PenaltyRows"]:
        """The state for rows with these options (one entry per row); None when no row needs any."""
        penalise = any(r != 1.0 for r in repetition) or any(f != 0.0 for f in frequency) or \
            any(p != 0.0 for p in presence)
        bias = dense_bias(logit_bias, vocab_size, device)
        if not penalise and bias is None:
            return None
        f = lambda xs: torch.tensor(list(xs), dtype=torch.float32, device=device)  # noqa: E731
        counts = torch.zeros(len(repetition) if penalise else 0, vocab_size, dtype=torch.float32, device=device)
        return cls(counts=counts, repetition=f(repetition), frequency=f(frequency), presence=f(presence),
                   bias=bias, penalise=penalise)

    @classmethod
    def for_params(cls, params: Sequence[Any], *, vocab_size: int, device: torch.device) -> Optional["PenaltyRows"]:
        """`build` from one SamplingParams-like object per row (fields repetition_penalty, frequency_penalty,
        presence_penalty, logit_bias as (id, bias) pairs)."""
        return cls.build(repetition=[p.repetition_penalty for p in params],
                         frequency=[p.frequency_penalty for p in params], presence=[p.presence_penalty for p in params],
                         logit_bias=[dict(p.logit_bias) for p in params], vocab_size=vocab_size, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (any float dtype) -> transformed logits [B, V] fp32."""
        logits = logits.float()
        if self.penalise:
            logits = apply_penalties(logits, self.counts, repetition=self.repetition, frequency=self.frequency,
                                     presence=self.presence)
        return logits if self.bias is None else logits + self.bias

    def update(self, tokens: torch.Tensor, live: torch.Tensor) -> None:
        """Count the tokens just drawn: tokens [B] int64, live [B] bool (rows that really appended one)."""
        if self.penalise:
            self.counts.scatter_add_(1, tokens.unsqueeze(-1), live.to(torch.float32).unsqueeze(-1))

    def select(self, idx: torch.Tensor) -> "PenaltyRows":
        """The rows `idx` [B'] int64 (batch compaction)."""
        pick = lambda x: x.index_select(0, idx) if x is not None and x.numel() else x  # noqa: E731
        return PenaltyRows(counts=pick(self.counts), repetition=pick(self.repetition),
                           frequency=pick(self.frequency), presence=pick(self.presence), bias=pick(self.bias),
                           penalise=self.penalise)
