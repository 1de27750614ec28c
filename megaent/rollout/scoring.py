"""Teacher-forced log-probs of a token sequence: SGLang's input-token and top log-probs.

`score_tokens(engine, ids, temperature=, start=, top_n=)` runs one forward of
the engine's policy over `ids` (no KV cache) and returns, for every position
p >= max(start, 1), the log-prob of ids[p] given ids[:p] under
log softmax(logits / T) in fp32 (T = 1 for greedy, as for the sampled tokens:
see megaent.rollout.types), and the `top_n` most likely tokens there. That is
what SGLang returns as `input_token_logprobs` / `input_top_logprobs` (its
logits processor over the prompt) and, on the output positions,
`output_top_logprobs`. The decode's own per-token log-probs stay the engine's.

The head runs on `CHUNK` positions at a time, so a long sequence never holds
[S, V] logits. With TP > 1 every rank runs this in lockstep (the server's TP
bus) and the vocab shards are all-gathered (one all-gather per chunk).
"""
from __future__ import annotations

from typing import Any

import torch

from megaent.rollout.embedded import gather_vocab

CHUNK = 256


@torch.no_grad()
def score_tokens(engine: Any, ids: list[int], temperature: float, start: int, top_n: int
                 ) -> tuple[list[float], list[list[tuple[float, int]]]]:
    """ids [S] -> (logprob of ids[p] for p in [max(start, 1), S), top_n (logprob, id) pairs there)."""
    policy, state = engine.policy, engine.state
    x = torch.tensor([ids], dtype=torch.long, device=state.device)  # [1, S]
    pos = torch.arange(len(ids), device=state.device).unsqueeze(0)
    hidden = policy.final_hidden(x, pos)  # [1, S, H]
    t = temperature if temperature > 0 else 1.0
    group = state.tp_group if state.tp > 1 else None
    lps: list[float] = []
    tops: list[list[tuple[float, int]]] = []
    first = max(start, 1)
    for a in range(first - 1, len(ids) - 1, CHUNK):  # logits at p - 1 predict ids[p]
        b = min(a + CHUNK, len(ids) - 1)
        logits = gather_vocab(policy.compute_logits(hidden[:, a:b])[0].float(), group)[:, :engine.vocab_size]
        logp = torch.log_softmax(logits / t, dim=-1)  # [b - a, V] fp32
        nxt = x[0, a + 1:b + 1]
        lps += logp.gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()
        if top_n > 0:
            v, i = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
            tops += [list(zip(vr, ir)) for vr, ir in zip(v.tolist(), i.tolist())]
    return lps, tops
