"""Vocab-parallel log-prob/entropy ops, the fused LM head, masked global statistics, metrics."""
from megaent.ops.fused_head import fused_head_logprobs_entropy
from megaent.ops.logprobs import vocab_parallel_logprobs_entropy
from megaent.ops.metrics import token_mean_entropy, top_fraction_mean
from megaent.ops.stats import global_sum, masked_cov, masked_mean, masked_sum_count, masked_var

__all__ = ["fused_head_logprobs_entropy", "global_sum", "masked_cov", "masked_mean", "masked_sum_count",
           "masked_var", "token_mean_entropy", "top_fraction_mean", "vocab_parallel_logprobs_entropy"]
