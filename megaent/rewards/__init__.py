"""megaent.rewards: verifiers (math-verify in a killable process pool) and synthetic tasks."""
from megaent.rewards.extract import extract_answer, ground_truth_answer, last_boxed
from megaent.rewards.math import score_math
from megaent.rewards.pool import SCORERS, RewardPool, RewardResult
from megaent.rewards.synthetic import TASKS, ArithTask, score_exact

__all__ = [
    "ArithTask", "RewardPool", "RewardResult", "SCORERS", "TASKS",
    "extract_answer", "ground_truth_answer", "last_boxed", "score_exact", "score_math",
]
