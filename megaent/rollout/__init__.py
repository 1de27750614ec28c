"""Rollout: the engine protocol, the embedded engine, `megaent serve`, the SGLang client/launcher, weight sync.

    from megaent.rollout import EmbeddedEngine, SGLangClient, SamplingParams
    engine.generate(prompts, SamplingParams(n=8, max_new_tokens=256)) -> samples[i][j]

Log-prob semantics (full-vocabulary log softmax(logits / T), before top-p/top-k;
SGLang's default `output_token_logprobs`): see `megaent.rollout.types`.
"""
from megaent.rollout.client import SGLangClient
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.engine import RolloutEngine, logprob_consistency
from megaent.rollout.types import RolloutError, Sample, SamplingParams

__all__ = ["EmbeddedEngine", "RolloutEngine", "RolloutError", "SGLangClient", "Sample", "SamplingParams",
           "logprob_consistency"]
