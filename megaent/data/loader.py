"""Batches of prompts in a deterministic shuffled order with an exact resume position.

Epoch e visits the dataset in the permutation drawn from (seed, e) (or in
order when shuffle=False), `batch_size` prompts at a time; a tail shorter
than a batch is skipped so every batch has the same size, and the next epoch
begins. `state_dict()` = {"epoch", "index"} (index = position inside the
epoch's permutation) is all that a resume needs: the permutation is a pure
function of (seed, epoch).
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

from megaent.data.prompts import Prompt


class PromptLoader:
    """Endless iterator of `list[Prompt]` batches (one per RL step).

    Args:
        dataset: a Sequence[Prompt] (PromptDataset, SyntheticPrompts).
        batch_size: prompts per batch (trainer.prompts_per_step).
        seed: shuffle seed (trainer.seed).
        shuffle: permute each epoch (data.shuffle).
    """

    def __init__(self, dataset: Sequence[Prompt], *, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1 or batch_size > len(dataset):
            raise ValueError(
                f"trainer.prompts_per_step={batch_size}: must be in [1, {len(dataset)}] (the dataset size)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(f"megaent-data/{self.seed}/{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_batch(self) -> list[Prompt]:
        """The next `batch_size` prompts; advances the position."""
        if self.index + self.batch_size > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order_for(self.epoch)
        batch = [self.dataset[i] for i in order[self.index : self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[Prompt]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Position: {"epoch", "index"} (plus seed and sizes, checked on load)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; refuses a position saved for another dataset size or seed."""
        for key, mine in (("seed", self.seed), ("size", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"data loader state has {key}={state[key]} but this loader has {key}={mine}; "
                    "resume with the same data file, filters and trainer.seed"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
