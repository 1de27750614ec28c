"""pass@k estimator against brute-force enumeration of all k-subsets; `megaent eval` CLI errors exit 2.
Run: pytest tests/test_eval.py
"""
import itertools
import subprocess
import sys

import pytest

from megaent.trainer.evaluate import pass_at_k


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 6, 4), (5, 5, 2), (10, 1, 10), (6, 2, 3)])
def test_pass_at_k_matches_enumeration(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_eval_bad_target_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "megaent.cli", "eval", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "expected a run directory" in p.stderr
    p = subprocess.run([sys.executable, "-m", "megaent.cli", "eval", "configs/demo.yaml", "--n", "2", "--k", "4"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--k 4" in p.stderr
