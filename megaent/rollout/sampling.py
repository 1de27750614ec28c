"""Next-token sampling for a batch of rows with per-row options, and its random numbers.

Pure tensor ops, no process group, no Python loop over rows:

- `sample_next(logits, temperature=, top_p=, top_k=, uniform=)` draws one token per
  row by inverse-CDF sampling from softmax(logits / T) restricted by top-k then
  top-p (SGLang's torch fallback order and rule: top-k on the sorted probs, then
  drop tokens whose exclusive cumulative probability exceeds top_p;
  python/sglang/srt/layers/sampler.py `top_k_top_p_min_p_sampling_from_probs_torch`).
  Optional `min_p` then also drops tokens whose probability is below min_p
  times the row's largest (SGLang's rule, same function; HF's `MinPLogitsWarper`
  computes the same set), on softmax(logits / T), i.e. after temperature.
  It returns the fp32 log-prob of the drawn token under the UNtruncated
  log softmax(logits / T) (see `megaent.rollout.types` for why).
  Logit penalties and `logit_bias` are applied before, by `megaent.rollout.penalties`.
- `row_keys` / `counter_uniform` give every row its own reproducible stream of
  uniforms: u[b, t] = splitmix64(key_b + t * gamma), the key hashed from (seed,
  prompt index, sample index). Unlike one `torch.Generator` drawing for the whole
  batch, a row's sample then does not depend on which other rows share its batch,
  so the server's dynamic batcher, the client's retries on another server and
  the embedded engine all give the same sample for the same (seed, prompt, j);
  and every TP rank computes the same numbers without a broadcast.
  (splitmix64: Steele, Lea, Flood, "Fast splittable pseudorandom number
  generators", OOPSLA 2014; constants from Vigna's public-domain reference.)

int64 arithmetic wraps modulo 2^64 in torch (two's complement, as the C++ kernels
compile); tests/test_rollout_sampling.py checks the hash against a pure-Python
splitmix64 so a platform where that fails is caught.
"""
from __future__ import annotations

from typing import Optional

import torch

_MASK64 = (1 << 64) - 1


def _s64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_GAMMA = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 [*] -> int64 [*] (bit pattern of the uint64 result)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def row_keys(seed: torch.Tensor, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Per-row stream keys: int64 [B] from seed, prompt index and sample index (int64 [B] each)."""
    k = mix64(seed.to(torch.int64) * _GAMMA + 0x5EED)
    k = mix64(k + prompt_index.to(torch.int64) * _GAMMA)
    return mix64(k + sample_index.to(torch.int64) * _GAMMA + 1)


def counter_uniform(keys: torch.Tensor, step: int) -> torch.Tensor:
    """Uniforms in [0, 1): keys int64 [B], decode step t -> fp32 [B] (24 random bits each)."""
    h = mix64(keys + _s64(step * 0x9E3779B97F4A7C15))
    return _shr(h, 40).to(torch.float32) * (1.0 / (1 << 24))


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised probs [B, K] fp32 with uniform [B] -> int64 [B]; never a zero-prob entry."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    # x < total strictly, so the first cdf entry above x has positive mass.
    x = torch.minimum(uniform.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _truncate_sorted(probs_sorted: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Zero the entries top-k / top-p drop; probs_sorted [B, K] descending, top_p [B], top_k [B] (<= 0 = off)."""
    k_eff = torch.where(top_k > 0, top_k, probs_sorted.shape[-1])
    rank = torch.arange(probs_sorted.shape[-1], device=probs_sorted.device)
    keep = rank.unsqueeze(0) < k_eff.unsqueeze(-1)
    probs_sorted = probs_sorted * keep
    exclusive = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
    keep_p = (exclusive <= top_p.unsqueeze(-1)) | (top_p >= 1.0).unsqueeze(-1)  # fp32 cumsum may pass 1.0
    return probs_sorted * keep_p


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    uniform: torch.Tensor,
    need_truncation: Optional[bool] = None,
    any_greedy: Optional[bool] = None,
    unit_temperature: Optional[bool] = None,
    min_p: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    logits [B, V] (any float dtype; computed in fp32), temperature [B] fp32 (0 =
    greedy), top_p [B] fp32, top_k [B] int64 (<= 0 = off), uniform [B] fp32 in
    [0, 1) -> (tokens [B] int64, logprobs [B] fp32), logprobs = log softmax(logits /
    T) at the token over the full vocabulary (T = 1 for greedy rows). No
    collectives. Ties at a row's top-k / top-p cut-off are all kept. Host bools the caller already knows skip
    device checks: `need_truncation` (any row uses top-p / top-k / min-p), `any_greedy` (any temperature 0),
    `unit_temperature` (every row samples at T = 1, so the logits need no scaling). min_p [B] fp32 in [0, 1]
    (0 = off; None = off for every row).
    """
    logits = logits.float()
    greedy = temperature <= 0
    if unit_temperature is None:
        unit_temperature = bool((temperature == 1.0).all())
    if unit_temperature:
        scaled = logits
    else:
        t = torch.where(greedy, torch.ones_like(temperature), temperature)
        scaled = logits / t.unsqueeze(-1)
    if need_truncation is None:
        cut = (top_p < 1.0) | (top_k > 0)
        need_truncation = bool((cut if min_p is None else cut | (min_p > 0)).any())
    if any_greedy is None:
        any_greedy = bool(greedy.any())
    if not need_truncation:
        # Untruncated rows (the RL case) skip the full log-softmax: unnormalised probs exp(x - max) feed the
        # inverse CDF directly and only the drawn token's log-prob is normalised (sum, not the cumsum's last
        # entry, for an accurately summed normaliser).
        top = scaled.amax(dim=-1, keepdim=True)
        probs = (scaled - top).exp_()
        tokens = _inverse_cdf(probs, uniform)
        if any_greedy:
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
        log_norm = top.squeeze(-1) + probs.sum(-1).log()
        return tokens, scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_norm
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V] fp32
    # Find each row's smallest kept log-prob on the sorted view, then mask in vocabulary order,
    # so the inverse CDF walks the same order whether or not a row (or its batch) truncates.
    k_max = int(top_k.max()) if bool((top_k > 0).all()) else 0
    if 0 < k_max < logits.shape[-1]:
        lp_sorted, _ = torch.topk(logp, k_max, dim=-1)  # every row keeps <= k_max: partial sort
    else:
        lp_sorted, _ = torch.sort(logp, dim=-1, descending=True)
    kept = (_truncate_sorted(lp_sorted.exp(), top_p, top_k) > 0).sum(-1, keepdim=True)  # [B, 1] >= 1
    cutoff = lp_sorted.gather(-1, kept - 1)  # [B, 1]
    keep = logp >= cutoff
    if min_p is not None:
        # p >= min_p * p_max in log space (log 0 = -inf keeps all); the row's top token always survives.
        keep &= logp >= lp_sorted[:, :1] + torch.log(min_p).unsqueeze(-1)
    probs = logp.exp() * keep
    tokens = _inverse_cdf(probs, uniform)
    if any_greedy:
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
