"""Benchmark: fused LM head log-prob + entropy vs the naive materialised path (fwd + bwd).

    python tools/bench_ops.py                      # CPU, T=2048, H=896, V=151936 (Qwen2.5-0.5B head)
    python tools/bench_ops.py --device cuda        # GPU, T=16384
    python tools/bench_ops.py --tokens 512 --reps 1 --warmup 0   # quicker

naive (the reference): logits = hidden @ W.T [T, V] fp32, log_softmax, gather, entropy
= -(p * logp).sum(-1), backward through all of it (autograd). ours: `fused_head_logprobs_entropy`
with `--chunk-size` vocab columns per chunk. Both backpropagate loss = sum(w1 * logp) +
sum(w2 * entropy) into hidden and weight.

Each variant runs in a fresh subprocess. Peak extra memory = peak minus the memory held
after the inputs are allocated: on CPU `ru_maxrss` (lifetime high-water mark of the
process) minus the resident set size measured just before the first call; on CUDA
`max_memory_allocated` minus `memory_allocated`. It includes the [V, H] weight gradient,
which both variants must produce. Times are medians of `--reps` after `--warmup` runs.
Prints a table `name ours ref ratio`, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_variant(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megaent.ops import fused_head_logprobs_entropy

    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    t, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(t, h, device=dev, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (t,), device=dev, generator=g)
    w1, w2 = torch.randn(t, device=dev, generator=g), torch.randn(t, device=dev, generator=g)

    def naive():
        logp_all = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)  # [T, V]
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp, ent

    def fused():
        return fused_head_logprobs_entropy(hidden, weight, targets, chunk_size=args.chunk_size)

    fn = naive if args.variant == "naive" else fused

    def step():
        hidden.grad = weight.grad = None
        logp, ent = fn()
        ((logp * w1).sum() + (ent * w2).sum()).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    times = []
    for i in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return {"time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=None, help="T (default 2048 on cpu, 16384 on cuda)")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk-size", type=int, default=4096, help="vocab columns per chunk of the fused op")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variant", choices=["naive", "fused"], help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = 16384 if args.device == "cuda" else 2048
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return 0
    res = {}
    for variant in ("naive", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--device", args.device,
               "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
               "--chunk-size", str(args.chunk_size), "--warmup", str(args.warmup), "--reps", str(args.reps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    ours, ref = res["fused"], res["naive"]
    rows = [("time_s", ours["time_s"], ref["time_s"]),
            ("peak_extra_MiB", ours["peak_extra_bytes"] / 2**20, ref["peak_extra_bytes"] / 2**20)]
    print(f"{'name':<16}{'ours':>12}{'ref':>12}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<16}{a:>12.3f}{b:>12.3f}{a / b:>8.3f}")
    summary = {"bench": "fused_head_logprobs_entropy", "device": args.device, "T": args.tokens, "H": args.hidden,
               "V": args.vocab, "chunk_size": args.chunk_size, "warmup": args.warmup, "reps": args.reps,
               "ours_time_s": ours["time_s"], "ref_time_s": ref["time_s"], "time_ratio": ours["time_s"] / ref["time_s"],
               "ours_peak_extra_bytes": ours["peak_extra_bytes"], "ref_peak_extra_bytes": ref["peak_extra_bytes"],
               "mem_ratio": ours["peak_extra_bytes"] / ref["peak_extra_bytes"],
               "ours_times_s": ours["times_s"], "ref_times_s": ref["times_s"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
