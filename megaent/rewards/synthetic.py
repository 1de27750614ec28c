"""Synthetic verifiable task for the CPU demo: multi-digit addition.

A prompt is `"<a>+<b>="` and the answer the decimal sum. By default operands
are zero-padded to `max_digits` and the sum to `max_digits + 1`
(`"07+24="` -> `"031"`): aligned digits let a 2-layer model learn the task
in a few hundred steps; `fixed_width=False` gives the natural form
(`"12+345="` -> `"357"`), which a tiny model learns far more slowly. Operand
lengths are drawn uniformly from 1..`max_digits`. After a short supervised
warm-up (`megaent.data.warmup`) the policy is right on a fraction of prompts,
which leaves RL something to learn and entropy to spend.

Problems are a pure function of (seed, index): `problem(i)` never depends on
which other problems were drawn, so datasets are lazy and exactly resumable.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ArithTask:
    """Addition of two non-negative integers with 1..max_digits digits each."""

    max_digits: int = 2
    """Longest operand length in digits."""
    seed: int = 0
    """Seed of the problem stream; problem(i) depends only on (seed, i)."""
    fixed_width: bool = True
    """Zero-pad operands to max_digits and the sum to max_digits + 1 ("07+24=" -> "031"): aligned digits, easier to learn."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 18:
            raise ValueError(f"ArithTask max_digits={self.max_digits}: must be in [1, 18]")

    def problem(self, index: int) -> tuple[str, str]:
        """(prompt, answer) number `index` of this task's stream."""
        rng = random.Random(f"arith/{self.seed}/{self.max_digits}/{index}")
        a = self._operand(rng)
        b = self._operand(rng)
        if self.fixed_width:
            w = self.max_digits
            return f"{a:0{w}d}+{b:0{w}d}=", f"{a + b:0{w + 1}d}"
        return f"{a}+{b}=", str(a + b)

    def _operand(self, rng: random.Random) -> int:
        n = rng.randint(1, self.max_digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def score_exact(response: str, answer: str, format_reward: float = 0.0) -> tuple[float, bool]:
    """Exact-match reward of a synthetic-task response (special tokens already stripped).

    Returns (reward, format_ok): format_ok when the stripped response is a
    digit string; reward = 1.0 if it equals `answer` exactly, plus
    `format_reward` when format_ok.
    """
    text = response.strip()
    format_ok = _DIGITS.fullmatch(text) is not None
    correct = format_ok and text == answer.strip()
    return (1.0 if correct else 0.0) + (format_reward if format_ok else 0.0), format_ok


TASKS = {"arith": ArithTask}
"""Synthetic tasks by `data.task` name."""
