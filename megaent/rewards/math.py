"""Math reward: final-answer extraction + `math-verify` equivalence (one sample).

`score_math` is the unit of work a `RewardPool` worker runs. It is pure and
has no timeout of its own: math-verify's internal (signal-based) timeouts are
switched off because a pathological expression such as `9^{9^{9^{9}}}` can
sit inside one C-level big-integer operation where no Python signal handler
runs. The pool's per-sample deadline, which kills the worker process, is the
only guard (see `megaent.rewards.pool`).
"""
from __future__ import annotations

import logging

from megaent.rewards.extract import extract_answer, ground_truth_answer

_quiet = False


def _silence_math_verify() -> None:
    # math-verify warns on every call that its timeout is disabled; we know.
    global _quiet
    if not _quiet:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _quiet = True


def score_math(response: str, answer: str, format_reward: float = 0.0) -> tuple[float, bool]:
    """Reward of one response against one ground truth.

    Args:
        response: generated text; its final answer is the last `\\boxed{}`,
            else the last `Answer:` line, else the last `####` line.
        answer: ground truth, plain (`"\\frac{1}{2}"`) or a solution with a box.
        format_reward: added when an answer form is present (0 = off).

    Returns:
        (reward, format_ok): reward = 1.0 if math-verify finds the extracted
        answer equivalent to the ground truth else 0.0, plus `format_reward`
        when format_ok. A response with no answer form scores 0.0.
    """
    from math_verify import parse, verify  # imported in the worker, not at megaent import

    _silence_math_verify()
    pred_text = extract_answer(response)
    if pred_text is None:
        return 0.0, False
    gold = parse("\\boxed{" + ground_truth_answer(answer) + "}", parsing_timeout=None)
    pred = parse("\\boxed{" + pred_text + "}", parsing_timeout=None)
    ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
    return (1.0 if ok else 0.0) + format_reward, True
