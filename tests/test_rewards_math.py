"""Math verifier: answer extraction and math-verify equivalence on a table of tricky cases, plus timeouts.

Reference: each case's expected verdict is the mathematical truth written in
the table (equal / not equal / no answer), independent of the code; pool
results are also compared with in-process scoring of the same inputs. The hang
cases (a real pathological power tower and a scorer that sleeps) must return
within the deadline with reward 0, a counted timeout, and a working pool after.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_rewards_math.py -q
"""
import time

import pytest

from megaent.rewards import RewardPool, extract_answer, ground_truth_answer, last_boxed, score_math

# (response, ground truth, expected reward, expected format_ok)
CASES = [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0, True),
    ("thus \\boxed{0.5}", "\\frac{1}{2}", 1.0, True),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0, True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt3}{2}", 1.0, True),
    ("\\boxed{(1,2]}", "(1,2]", 1.0, True),
    ("\\boxed{[1,2)}", "(1,2]", 0.0, True),  # interval ends differ
    ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", 1.0, True),  # set order
    ("\\boxed{10\\text{ cm}}", "10", 1.0, True),  # \text{} unit
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0, True),
    ("first \\boxed{3}, no wait, \\boxed{4}", "4", 1.0, True),  # last box wins
    ("first \\boxed{4}, no wait, \\boxed{3}", "4", 0.0, True),
    ("Answer: 42", "42", 1.0, True),
    ("work...\n#### 24", "24", 1.0, True),
    ("\\boxed{7}", "We find $x=\\boxed{7}$.", 1.0, True),  # MATH solution as ground truth
    ("\\boxed{3}", "4", 0.0, True),  # wrong
    ("the answer is four", "4", 0.0, False),  # no answer form
    ("", "1", 0.0, False),
]


def test_extraction_forms():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"  # nested braces
    assert last_boxed("\\boxed{1} and \\fbox{2}") == "2"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\boxed 5 dollars") == "5"
    assert extract_answer("blah\nAnswer: $3/4$.") == "3/4"
    assert extract_answer("Final answer: \\boxed{9}") == "9"
    assert extract_answer("x\n#### 1,000") == "1,000"
    assert extract_answer("no answer here") is None
    assert ground_truth_answer("so $\\boxed{\\{1,2\\}}$") == "\\{1,2\\}"
    assert ground_truth_answer(" 17 ") == "17"


@pytest.mark.parametrize("response,truth,reward,fmt", CASES)
def test_table_in_process(response, truth, reward, fmt):
    assert score_math(response, truth) == (reward, fmt)
    assert score_math(response, truth, 0.1) == (reward + (0.1 if fmt else 0.0), fmt)


def _sleepy(response: str, answer: str, format_reward: float = 0.0):
    if response == "hang":
        time.sleep(60)
    return (1.0 if response == answer else 0.0), True


def test_pool_table_and_timeouts():
    responses = [c[0] for c in CASES]
    truths = [c[1] for c in CASES]
    # Generous deadline for the table (sympy on a loaded 2-core CPU), tight one for the hang.
    with RewardPool("math", workers=2, timeout_s=30.0, format_reward=0.5) as pool:
        res = pool.score(responses, truths)
        ref = [score_math(r, t, 0.5) for r, t in zip(responses, truths)]
        assert res.rewards == [r for r, _ in ref]
        assert res.format_ok == [f for _, f in ref]
        assert res.timeouts == 0 and res.errors == 0

        # A real pathological expression: sympy evaluates 9^(9^(9^9)) in one C call.
        pool.timeout_s = 2.0
        t0 = time.monotonic()
        res = pool.score(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{2}", "\\boxed{5}"], ["1", "2", "5"])
        took = time.monotonic() - t0
        assert res.rewards == [0.0, 1.5, 1.5]  # format_reward 0.5 on the answered ones
        assert res.timed_out == [True, False, False] and res.timeouts == 1
        assert took < 2.0 + 15.0  # deadline + generous slack for a loaded CPU (worker restart not awaited)
        assert pool.replaced == 1
        assert res.metrics()["reward/verifier_timeouts"] == 1.0
        # The replaced worker serves the next call.
        res = pool.score(["\\boxed{\\frac{2}{4}}"] * 4, ["0.5"] * 4)
        assert res.rewards == [1.5] * 4 and res.timeouts == 0


def test_pool_sleeping_scorer_is_killed():
    with RewardPool(workers=1, timeout_s=1.0, scorer=_sleepy) as pool:
        pool.score(["warm"], ["warm"])  # wait for the worker to be up
        t0 = time.monotonic()
        res = pool.score(["hang", "a", "b"], ["x", "a", "c"])
        took = time.monotonic() - t0
        assert res.rewards == [0.0, 1.0, 0.0]
        assert res.timeouts == 1 and res.timed_out[0]
        assert took < 1.0 + 20.0  # one kill + one fresh worker start, far below the 60 s sleep
        assert pool.replaced == 1


def test_pool_input_errors():
    with pytest.raises(ValueError, match="reward.kind='nope'"):
        RewardPool("nope")
    with RewardPool("synthetic", workers=0) as pool:
        with pytest.raises(ValueError, match="2 responses but 1 answers"):
            pool.score(["1", "2"], ["1"])
        assert pool.score(["12", " 12 ", "13", "x"], ["12"] * 4).rewards == [1.0, 1.0, 0.0, 0.0]
