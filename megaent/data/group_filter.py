"""Group filtering (DAPO dynamic sampling): keep prompts whose samples disagree.

A group is the G samples of one prompt. When all G rewards are equal the
group-normalised advantage is zero for every sample, so it carries no policy
gradient and only dilutes the token-mean loss. DAPO (Yu et al. 2025, arXiv
2503.14476, section 3.2) drops such groups and samples more prompts until the
batch is full. These are pure functions; rollouts come in through a callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


def informative(rewards: Sequence[float]) -> bool:
    """True when a group's rewards are not all equal (a group of one never is)."""
    return len(rewards) > 1 and max(rewards) != min(rewards)


def filter_groups(groups: Sequence[T], rewards: Sequence[Sequence[float]]) -> list[T]:
    """The groups whose rewards are not all equal, in input order."""
    if len(groups) != len(rewards):
        raise ValueError(f"filter_groups: {len(groups)} groups but {len(rewards)} reward lists")
    return [g for g, r in zip(groups, rewards) if informative(r)]


@dataclass
class FillResult(Generic[T]):
    """Outcome of `fill_batch`."""

    groups: list[T]
    """Kept groups, at most `target` (the first kept in sampling order)."""
    rounds: int
    """Sampling rounds used."""
    sampled: int
    """Groups sampled over all rounds."""
    kept: int
    """Informative groups seen over all rounds (before trimming to target)."""
    full: bool = field(default=False)
    """The batch reached `target` groups."""

    def metrics(self) -> dict[str, float]:
        return {
            "group_filter/rounds": float(self.rounds),
            "group_filter/kept_frac": self.kept / max(self.sampled, 1),
            "group_filter/batch_full": float(self.full),
        }


def fill_batch(
    sample_more: Callable[[int, int], tuple[Sequence[T], Sequence[Sequence[float]]]],
    *,
    target: int,
    max_tries: int,
    drop_uninformative: bool = True,
) -> FillResult[T]:
    """Accumulate informative groups over rounds until `target` are kept or `max_tries` rounds are spent.

    Args:
        sample_more: `(n_missing, round) -> (groups, rewards per group)`; called
            with how many groups the batch still lacks (it may return more or fewer).
        target: groups wanted (prompts per step).
        max_tries: most rounds; when spent, whatever was kept is returned
            (`full=False`), possibly nothing.
        drop_uninformative: False keeps every group (the filter off: one round fills the batch).
    """
    if target < 1 or max_tries < 1:
        raise ValueError(f"fill_batch: target={target} and max_tries={max_tries} must both be >= 1")
    kept: list[T] = []
    sampled = n_kept = rounds = 0
    while rounds < max_tries and len(kept) < target:
        groups, rewards = sample_more(target - len(kept), rounds)
        rounds += 1
        sampled += len(groups)
        good = filter_groups(groups, rewards) if drop_uninformative else list(groups)
        n_kept += len(good)
        kept.extend(good)
    return FillResult(kept[:target], rounds, sampled, n_kept, full=len(kept) >= target)
