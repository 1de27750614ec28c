"""SFT warm-up of the demo policy: determinism, caching, and an imperfect sampled success rate.

Reference: held-out prompts (another task seed) are answered by HF
`generate` (do_sample, temperature 1) on the saved directory loaded with
`AutoModelForCausalLM` / `AutoTokenizer`, and scored by exact comparison with
the sum computed here from the prompt's operands (not the task's answer).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_data_warmup.py -q   (the slow test trains ~500 steps)
"""
import json
import time

import pytest
import torch
from safetensors.torch import load_file

from megaent.data.warmup import MARKER, warmup_policy
from megaent.rewards.synthetic import ArithTask


def test_deterministic_and_cached(tmp_path):
    a = warmup_policy(tmp_path / "a", steps=3, seed=7, hidden=32, layers=1, heads=2, kv_heads=1, batch_size=4)
    b = warmup_policy(tmp_path / "b", steps=3, seed=7, hidden=32, layers=1, heads=2, kv_heads=1, batch_size=4)
    c = warmup_policy(tmp_path / "c", steps=3, seed=8, hidden=32, layers=1, heads=2, kv_heads=1, batch_size=4)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    # Cached: same arguments return at once without retraining (the marker is untouched).
    stamp = (a / MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert warmup_policy(a, steps=3, seed=7, hidden=32, layers=1, heads=2, kv_heads=1, batch_size=4) == a
    assert time.perf_counter() - t0 < 1.0 and (a / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="another out_dir"):
        warmup_policy(a, steps=4, seed=7, hidden=32, layers=1, heads=2, kv_heads=1, batch_size=4)


@pytest.mark.slow
def test_sampled_success_is_imperfect(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    out = warmup_policy(tmp_path / "policy", seed=0)
    train_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    task = ArithTask(seed=424242)  # held-out stream, default task settings
    prompts = [task.problem(i)[0] for i in range(256)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    correct = 0
    for prompt, text in zip(prompts, texts):
        a, b = prompt.rstrip("=").split("+")
        correct += text.strip() == f"{int(a) + int(b):0{len(a) + 1}d}"
    rate = correct / len(prompts)
    info = json.loads((out / MARKER).read_text())
    print(f"warm-up {train_s:.1f} s, final loss {info['final_loss']:.3f}, sampled success {rate:.3f}")
    assert 0.05 < rate < 0.95, rate
