"""Tokens/s of one RL training step (PPO loss, 1F1B, DP reduce, AdamW) at several TP x PP x DP layouts.

Baseline measured in the same run: a plain single-process step of the HF `transformers` model (padded
batch, log_softmax, the same token-mean PPO objective, torch AdamW). Ranks are spawned on this machine
(gloo on CPU, NCCL on GPUs). On a GPU the table adds MFU: model FLOPs (6 * params * tokens plus causal
attention 6 * layers * S^2 * hidden per sequence, forward + backward) over the GPU's dense bf16 peak.
Prints `layout ours_tok_s ref_tok_s ratio [mfu]`, then one JSON line.

Usage: python tools/bench_train.py --world 4 --layouts 1x1,2x1,1x2,2x2 --hidden 64 --layers 4 --steps 3
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

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_hf(out: Path, *, hidden: int, layers: int, vocab: int) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(2, hidden // 32), num_key_value_heads=max(2, hidden // 64),
                      tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def make_samples(n: int, length: int, vocab: int):
    from megaent.trainer.batching import TrainSample

    g = torch.Generator().manual_seed(0)
    return [TrainSample(tokens=torch.randint(0, vocab, (length,), generator=g), prompt_len=length // 4,
                        advantage=float(torch.randn(1, generator=g)), group=k // 4, uid=k) for k in range(n)]


def model_flops(n_params: int, layers: int, hidden: int, seq: int, tokens: int) -> float:
    return 6.0 * n_params * tokens + 6.0 * layers * hidden * seq * tokens  # causal: S^2/2 * 2 (QK, AV) * 3 (f+b)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, hf_dir: str, tp: int, pp: int, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    from megaent.config.schema import LossConfig, OptimizerConfig
    from megaent.model import load_hf
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.batching import make_micro_batches, partition_groups
    from megaent.trainer.optimizer import build_optimizer
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(tp, pp)
    try:
        dtype = torch.bfloat16 if st.device.type == "cuda" else torch.float32
        policy = load_hf(hf_dir, st, dtype=dtype)
        mine = partition_groups(make_samples(args.samples, args.seq, args.vocab), st.dp)[st.dp_rank]
        mbs = [mb.to(st.device) for mb in make_micro_batches(mine, max_tokens=args.max_tokens, dp_group=st.dp_group)]
        compute_logprobs(policy, mbs, state=st, fill_old=True)
        opt = build_optimizer(policy, cfg=OptimizerConfig(lr=1e-6), state=st)
        times = []
        for i in range(args.steps + 1):
            if st.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_mini_batch(policy, opt, mbs, loss_cfg=LossConfig(), state=st)
            if st.device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # first step is warm-up
                times.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save(statistics.median(times), Path(out) / "t.pt")
    finally:
        destroy_parallel()


def bench_ours(args, hf_dir: str, tp: int, pp: int) -> float:
    from megaent.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(args.world, free_port(), args, hf_dir, tp, pp, out), nprocs=args.world,
                           join=True, start_method="spawn")
        return torch.load(Path(out) / "t.pt")


def bench_ref(args, hf_dir: str) -> float:
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
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
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="TPxPP list; DP = world / (TP * PP)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        hf_dir = str(make_hf(Path(d) / "hf", hidden=args.hidden, layers=args.layers, vocab=args.vocab))
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            hf_dir).parameters())
        tokens = args.samples * args.seq
        ref_t = bench_ref(args, hf_dir)
        rows = []
        for lay in args.layouts.split(","):
            tp, pp = (int(x) for x in lay.split("x"))
            t = bench_ours(args, hf_dir, tp, pp)
            row = {"layout": f"tp{tp}pp{pp}dp{args.world // (tp * pp)}", "ours_tok_s": tokens / t,
                   "ref_tok_s": tokens / ref_t, "ratio": ref_t / t}
            if torch.cuda.is_available():
                name = torch.cuda.get_device_name()
                peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
                if peak:
                    fl = model_flops(n_params, args.layers, args.hidden, args.seq, tokens)
                    row["mfu"] = fl / t / (peak * args.world)
            rows.append(row)
    print(f"{'layout':<14}{'ours_tok_s':>12}{'ref_tok_s':>12}{'ratio':>8}{'mfu':>8}")
    for r in rows:
        print(f"{r['layout']:<14}{r['ours_tok_s']:>12.1f}{r['ref_tok_s']:>12.1f}{r['ratio']:>8.2f}"
              f"{r.get('mfu', float('nan')):>8.3f}")
    print(json.dumps({"bench": "train_step", "world": args.world, "tokens": tokens, "rows": rows}))


if __name__ == "__main__":
    main()
