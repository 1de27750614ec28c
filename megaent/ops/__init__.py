"""Vocab-parallel log-prob/entropy ops, the fused LM head, masked global statistics."""
from megaent.ops.stats import global_sum, masked_cov, masked_mean, masked_sum_count, masked_var

__all__ = ["global_sum", "masked_cov", "masked_mean", "masked_sum_count", "masked_var"]
