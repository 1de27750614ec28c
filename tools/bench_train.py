"""Tokens/s of one RL training step (PPO loss, 1F1B, DP reduce, AdamW) at several TP x PP x DP layouts.

Baseline measured in the same run: a plain single-process step of the HF `transformers` model (padded
batch, log_softmax, the same token-mean PPO objective, torch AdamW). Ranks are spawned on this machine
(gloo on CPU, NCCL on GPUs). Prints `layout ours_tok_s ref_tok_s ratio`, then one JSON line.

Usage: python tools/bench_train.py --world 4 --layouts 1x1,2x1,1x2,2x2 --hidden 64 --layers 4 --steps 3

GPU: `python tools/bench_train.py --device cuda` runs a 1.5B-shaped Qwen2 policy step (hidden 1536, 28 layers,
12 heads, 2 KV heads, MLP 8960, vocab 151936, random weights) once per `--precisions` entry (default bf16 and
fp8, `--backend te` when Transformer Engine imports, else local + torchao for fp8) and the HF bf16 baseline,
side by side: `variant ours_tok_s ref_tok_s ratio mfu`. MFU = `train_flops` / step time / (GPUs x dense BF16
peak of the GPU, `PEAK_BF16`); fp8 rows use the same BF16 peak, so their MFU also reads as speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

# Dense (no sparsity) BF16 tensor-core peak FLOP/s by device-name substring, first match wins (vendor specs).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H20": 148e12,
             "GB200": 2500e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
QWEN2_1P5B = dict(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936)


def small_shape(hidden: int, layers: int, vocab: int) -> dict[str, int]:
    """The CPU bench's model shape (as before: heads of 32, KV heads of 64 dims, MLP 4x)."""
    heads = max(2, hidden // 32)
    return dict(hidden=hidden, layers=layers, heads=heads, kv_heads=max(2, hidden // 64), head_dim=hidden // heads,
                intermediate=4 * hidden, vocab=vocab)


def make_hf(out: Path, *, shape: dict[str, int], dtype: torch.dtype = torch.float32) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], tie_word_embeddings=True,
                      max_position_embeddings=32768)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(out)
    return out


def make_samples(n: int, length: int, vocab: int):
    from megaent.trainer.batching import TrainSample

    g = torch.Generator().manual_seed(0)
    return [TrainSample(tokens=torch.randint(0, vocab, (length,), generator=g), prompt_len=length // 4,
                        advantage=float(torch.randn(1, generator=g)), group=k // 4, uid=k) for k in range(n)]


def peak_bf16(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def matmul_params(*, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                  vocab: int, **_: int) -> int:
    """Weights that take part in a matmul per token: q/k/v/o, gate/up/down per layer, and the LM head
    (the embedding lookup, norms and biases do no matmul)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * intermediate
    return layers * per_layer + hidden * vocab


def train_flops(*, seq_lens: list[int], hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                intermediate: int, vocab: int) -> float:
    """Model FLOPs of one forward + backward (backward = 2x forward) over sequences of `seq_lens` tokens.

    Matmuls: 2 FLOPs per weight per token forward, so 6 * matmul_params * tokens. Causal attention: query i
    of a sequence sees i + 1 keys; QK^T and AV each cost 2 * heads * head_dim * (i + 1) forward FLOPs, summed
    over i: 2 * q * S * (S + 1) per layer forward, times 3 for training. (Recomputation is not counted: MFU
    counts model FLOPs only.)
    """
    shape = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 intermediate=intermediate, vocab=vocab)
    tokens = sum(seq_lens)
    attn = sum(3 * layers * 2 * heads * head_dim * s * (s + 1) for s in seq_lens)
    return 6.0 * matmul_params(**shape) * tokens + float(attn)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, hf_dir: str, tp: int, pp: int, out: str,
          variant: dict | None = None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    from megaent.config.schema import LossConfig, ModelConfig, OptimizerConfig
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.batching import make_micro_batches, partition_groups
    from megaent.trainer.components import build_engine, load_policy
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(tp, pp)
    try:
        dtype = "bfloat16" if st.device.type == "cuda" else "float32"
        # backend / precision / recompute: the trainer's own load_policy (megatron-core GPTModel) applies them
        policy = load_policy(ModelConfig(dtype=dtype, **(variant or {})), Path(hf_dir), state=st)
        engine = build_engine(policy, OptimizerConfig(lr=1e-6), state=st)
        mine = partition_groups(make_samples(args.samples, args.seq, args.vocab), st.dp)[st.dp_rank]
        multiple = tp if policy.config.sequence_parallel else 1
        mbs = make_micro_batches(mine, max_tokens=args.max_tokens, dp_group=st.dp_group, share_prefix=False,
                                 multiple=multiple, device=st.device)
        compute_logprobs(engine, mbs, state=st, fill_old=True)
        times = []
        for i in range(args.steps + 1):
            if st.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_mini_batch(engine, mbs, loss_cfg=LossConfig(), state=st)
            if st.device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # first step is warm-up
                times.append(time.perf_counter() - t0)
        if rank == 0:
            mem = torch.cuda.max_memory_allocated() / 2**30 if st.device.type == "cuda" else 0.0
            torch.save({"t": statistics.median(times), "mem_gib": mem}, Path(out) / "t.pt")
    finally:
        destroy_parallel()


def bench_ours(args, hf_dir: str, tp: int, pp: int, variant: dict | None = None) -> dict:
    from megaent.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(args.world, free_port(), args, hf_dir, tp, pp, out, variant),
                           nprocs=args.world, join=True, start_method="spawn")
        return torch.load(Path(out) / "t.pt")


def bench_ref(args, hf_dir: str) -> float:
    from transformers import AutoModelForCausalLM

    dev = "cuda" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev == "cuda")
    ss = make_samples(args.samples, args.seq, args.vocab)
    ids = torch.stack([s.tokens for s in ss]).to(dev)
    adv = torch.tensor([s.advantage for s in ss], device=dev)[:, None]
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, ss[0].prompt_len - 1:-1] = 1
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        for chunk in range(0, len(ss), max(1, args.max_tokens // args.seq)):
            sl = slice(chunk, chunk + max(1, args.max_tokens // args.seq))
            lp = torch.log_softmax(model(ids[sl]).logits.float(), -1)[:, :-1].gather(-1, ids[sl, 1:, None])[..., 0]
            old = lp.detach()
            loss = -(adv[sl] * torch.exp(lp - old) * mask[sl, :-1]).sum() / mask.sum()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if dev == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    del model, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def _variants(args) -> list[tuple[str, dict]]:
    from megaent.model.backends import has_module

    backend = args.backend if args.backend != "auto" else ("te" if has_module("transformer_engine") else "local")
    out = []
    for prec in args.precisions.split(","):
        v = dict(backend=backend, precision=prec, fp8_recipe=args.fp8_recipe,
                 activation_checkpointing=args.activation_checkpointing)
        out.append((f"{backend}-{prec}" + (f"-{args.fp8_recipe}" if prec == "fp8" else ""), v))
    return out


def main_cuda(args) -> None:
    """1.5B-shaped Qwen2 (or --hidden/--layers overrides) on the GPUs, one row per precision + HF baseline."""
    shape = dict(QWEN2_1P5B)
    if args.layers_override:
        shape["layers"] = args.layers_override
    args.vocab = shape["vocab"]
    name = torch.cuda.get_device_name()
    peak = peak_bf16(name)
    tokens = args.samples * args.seq
    flops = train_flops(seq_lens=[args.seq] * args.samples, **shape)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        hf_dir = str(make_hf(Path(d) / "hf", shape=shape, dtype=torch.bfloat16))
        ref_t = bench_ref(args, hf_dir)
        tp, pp = (int(x) for x in args.layouts.split(",")[0].split("x"))
        for label, variant in _variants(args):
            r = bench_ours(args, hf_dir, tp, pp, variant)
            rows.append({"variant": label, "layout": f"tp{tp}pp{pp}dp{args.world // (tp * pp)}",
                         "ours_tok_s": tokens / r["t"], "ref_tok_s": tokens / ref_t, "ratio": ref_t / r["t"],
                         "mfu": (flops / r["t"] / (peak * args.world)) if peak else None, "mem_gib": r["mem_gib"]})
    print(f"device: {name} x {args.world}; dense bf16 peak {peak or float('nan'):.3g} FLOP/s; "
          f"{tokens} tokens/step; {flops:.4g} model FLOPs/step")
    print(f"{'variant':<22}{'ours_tok_s':>12}{'ref_tok_s':>12}{'ratio':>8}{'mfu':>8}{'mem_gib':>9}")
    for r in rows:
        print(f"{r['variant']:<22}{r['ours_tok_s']:>12.1f}{r['ref_tok_s']:>12.1f}{r['ratio']:>8.2f}"
              f"{(r['mfu'] if r['mfu'] is not None else float('nan')):>8.3f}{r['mem_gib']:>9.1f}")
    if len(rows) > 1:
        print(f"{rows[-1]['variant']} / {rows[0]['variant']} throughput: "
              f"{rows[-1]['ours_tok_s'] / rows[0]['ours_tok_s']:.2f}x")
    print(json.dumps({"bench": "train_step_gpu", "device": name, "world": args.world, "tokens": tokens,
                      "flops_per_step": flops, "shape": shape, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world", type=int, default=None, help="ranks (default 2 on CPU, 1 with --device cuda)")
    ap.add_argument("--layouts", default=None, help="TPxPP list; DP = world / (TP * PP) (cuda: first entry)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layers-override", type=int, default=0, help="cuda: fewer layers than 28 (smoke runs)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=None, help="default 16 (cpu) / 64 (cuda)")
    ap.add_argument("--seq", type=int, default=None, help="default 64 (cpu) / 1024 (cuda)")
    ap.add_argument("--max-tokens", type=int, default=None, help="micro-batch tokens, default 256 / 16384")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--precisions", default="bf16,fp8", help="cuda: compared side by side")
    ap.add_argument("--backend", choices=["auto", "local", "te"], default="auto")
    ap.add_argument("--fp8-recipe", choices=["delayed", "current", "mxfp8"], default="delayed")
    ap.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default="none")
    ap.add_argument("--tmp", default=None, help="cuda: where the random 1.5B HF checkpoint is written (3 GB)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (torch.cuda.is_available() is False)")
    args.world = args.world or (1 if gpu else 2)
    args.layouts = args.layouts or ("1x1" if gpu else "1x1,2x1,1x2")
    args.samples = args.samples or (64 if gpu else 16)
    args.seq = args.seq or (1024 if gpu else 64)
    args.max_tokens = args.max_tokens or (16384 if gpu else 256)
    if gpu:
        main_cuda(args)
        return
    shape = small_shape(args.hidden, args.layers, args.vocab)
    with tempfile.TemporaryDirectory() as d:
        hf_dir = str(make_hf(Path(d) / "hf", shape=shape))
        tokens = args.samples * args.seq
        ref_t = bench_ref(args, hf_dir)
        rows = []
        for lay in args.layouts.split(","):
            tp, pp = (int(x) for x in lay.split("x"))
            t = bench_ours(args, hf_dir, tp, pp)["t"]
            rows.append({"layout": f"tp{tp}pp{pp}dp{args.world // (tp * pp)}", "ours_tok_s": tokens / t,
                         "ref_tok_s": tokens / ref_t, "ratio": ref_t / t})
    print(f"{'layout':<14}{'ours_tok_s':>12}{'ref_tok_s':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['layout']:<14}{r['ours_tok_s']:>12.1f}{r['ref_tok_s']:>12.1f}{r['ratio']:>8.2f}")
    print(json.dumps({"bench": "train_step", "world": args.world, "tokens": tokens, "rows": rows}))


if __name__ == "__main__":
    main()
