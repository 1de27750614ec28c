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


def test_eval_of_a_file_smaller_than_prompts_takes_all_of_it(tmp_path):
    """`megaent eval HF --data FILE` with fewer rows than --prompts (default 64) evaluates the whole file."""
    import json

    from hf_tiny import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", layers=2, hidden=32)
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = subprocess.run([sys.executable, "-m", "megaent.cli", "eval", str(hf), "--data", str(tmp_path / "p.jsonl"),
                        "--n", "2", "--k", "1", "rollout.max_new_tokens=3"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["prompts"] == 5 and 0.0 <= result["pass@1"] <= 1.0
