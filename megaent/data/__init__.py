"""megaent.data: prompt datasets, batching with exact resume, group filter, demo tokenizer and warm-up."""
from megaent.data.group_filter import FillResult, fill_batch, filter_groups, informative
from megaent.data.loader import PromptLoader
from megaent.data.prompts import DataError, Prompt, PromptDataset, SyntheticPrompts, build_prompts, get_field
from megaent.data.tokenizer import build_task_tokenizer, save_task_tokenizer
from megaent.data.warmup import warmup_policy

__all__ = [
    "DataError", "FillResult", "Prompt", "PromptDataset", "PromptLoader", "SyntheticPrompts",
    "build_prompts", "build_task_tokenizer", "fill_batch", "filter_groups", "get_field",
    "informative", "save_task_tokenizer", "warmup_policy",
]
