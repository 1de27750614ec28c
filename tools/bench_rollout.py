"""Rollout throughput: megaent EmbeddedEngine vs HF `generate(do_sample=True)`, same model, same batch.

    python tools/bench_rollout.py [--prompts 8 --samples 8 --prompt-len 32 --new-tokens 64 --threads 2 ...]

Builds a random Qwen2 checkpoint in a temporary directory (nothing downloaded),
loads it into both engines and generates, for each workload, `prompts x samples`
rows of exactly `--new-tokens` tokens each (EOS ignored on both sides, temperature
1, no top-k / top-p; HF gets `num_return_sequences=samples`). Workloads:
- `grpo`: `--prompts` prompts x `--samples` samples, the shape of an RL rollout
  (a GRPO group shares its prompt; megaent prefills it once);
- `distinct`: the same number of rows, every row its own prompt (no sharing).
Reports the median tokens/s of `--repeats` timed runs after one warm-up (the two
engines interleaved, so load changes on a shared machine hit both): a table
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


def timed_pair(ours, ref, repeats: int) -> tuple[float, float]:
    """Median seconds of `ours` and `ref` after one warm-up each, runs interleaved (ours, ref, ours, ...) so a
    load change on a shared machine hits both sides alike."""
    ours(), ref()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for side, fn in enumerate((ours, ref)):
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch (grpo workload)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (grpo workload)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2,
                   help="intra-op threads for both engines (the CI machine class has 2 cores)")
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
    rows = a.prompts * a.samples
    tokens = rows * a.new_tokens
    result = {"bench": "rollout", "device": "cpu", "threads": a.threads, "prompts": a.prompts, "samples": a.samples,
              "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "hidden": a.hidden, "layers": a.layers,
              "vocab": a.vocab}
    print(f"{'name':<34}{'ours':>10}{'ref':>10}{'ratio':>8}")
    for name, n_prompts, n in (("grpo", a.prompts, a.samples), ("distinct", rows, 1)):
        prompts = torch.randint(2, a.vocab, (n_prompts, a.prompt_len), generator=g)
        params = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, seed=0, n=n)

        def ours() -> None:
            out = engine.generate(prompts.tolist(), params)
            assert all(len(s.output_ids) == a.new_tokens for group in out for s in group)

        def ref() -> None:
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                  top_k=None, top_p=None, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                  num_return_sequences=n, pad_token_id=0)
            assert out.shape == (rows, a.prompt_len + a.new_tokens)

        t_ours, t_ref = timed_pair(ours, ref, a.repeats)
        ours_tps, ref_tps = tokens / t_ours, tokens / t_ref
        label = f"{name} {n_prompts}x{n} tokens/s (cpu)"
        print(f"{label:<34}{ours_tps:>10.1f}{ref_tps:>10.1f}{ours_tps / ref_tps:>8.2f}")
        result[name] = {"ours_tokens_per_s": round(ours_tps, 1), "hf_generate_tokens_per_s": round(ref_tps, 1),
                        "ratio": round(ours_tps / ref_tps, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
