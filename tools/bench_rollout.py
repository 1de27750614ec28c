"""Rollout throughput: megaent EmbeddedEngine vs HF `generate(do_sample=True)`, same model, same batch.

    OMP_NUM_THREADS=1 python tools/bench_rollout.py [--batch 16 --prompt-len 32 --new-tokens 64 --hidden 256 ...]

Builds a random Qwen2 checkpoint in a temporary directory (nothing downloaded),
loads it into both engines, generates `--batch` samples of exactly `--new-tokens`
tokens each (EOS ignored on both sides, temperature 1, no top-k / top-p), and
reports the median tokens/s of `--repeats` timed runs after one warm-up: a table
`name ours ref ratio`, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_checkpoint(out: Path, a: argparse.Namespace) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from megaent.parallel import init_parallel
    from megaent.rollout.embedded import EmbeddedEngine
    from megaent.rollout.types import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "model", a)
        engine = EmbeddedEngine.from_hf(ckpt, init_parallel(1, 1))
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, a.vocab, (a.batch, a.prompt_len), generator=g)
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0)

    def ours() -> None:
        out = engine.generate(prompts.tolist(), params)
        assert all(len(s[0].output_ids) == a.new_tokens for s in out)

    def ref() -> None:
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                              top_k=None, top_p=None, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                              pad_token_id=0)
        assert out.shape[1] == a.prompt_len + a.new_tokens

    tokens = a.batch * a.new_tokens
    t_ours, t_ref = timed(ours, a.repeats), timed(ref, a.repeats)
    ours_tps, ref_tps = tokens / t_ours, tokens / t_ref
    print(f"{'name':<28}{'ours':>12}{'ref':>12}{'ratio':>8}")
    print(f"{'rollout tokens/s (cpu)':<28}{ours_tps:>12.1f}{ref_tps:>12.1f}{ours_tps / ref_tps:>8.2f}")
    print(json.dumps({"bench": "rollout", "device": "cpu", "threads": a.threads, "batch": a.batch,
                      "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "hidden": a.hidden,
                      "layers": a.layers, "vocab": a.vocab, "ours_tokens_per_s": round(ours_tps, 1),
                      "hf_generate_tokens_per_s": round(ref_tps, 1), "ratio": round(ours_tps / ref_tps, 2)}))


if __name__ == "__main__":
    main()
