"""Memory and time of a real training step on CPU: full-logits vs the fused LM head, and packed attention.

Section 1 (head): a Qwen2.5-0.5B-shaped random policy (hidden 896, vocab 151936, 14/2 heads, `--layers`
decoder layers, fp32) on megatron-core's engine, one process. One trainer step = old log-probs by a
forward-only pass + one PPO update (`update.compute_logprobs` + `update.train_mini_batch`) of `--tokens`
tokens, with `Engine.fused_head` True (vocab-chunked head) and False (full [T, V] logits). Peak = the largest
sum of live tensor storages (`megaent.trainer.memtrack.PeakMemory`), of the whole step and of its transient
part above the persistent state (parameters, main gradients, Adam moments); time = the same step's wall time
(second step, tracker off). Printed as fused / full ratios measured in this run.

Section 2 (attention): one 4096-token segment + `--short` 256-token segments, megaent's packed core attention
(`megaent.model.gpt.PackedCoreAttention`, one causal SDPA per segment: cost sum L^2) vs the padded layout
(every segment padded to the longest, one batched causal SDPA: cost n_seg x L_max^2); forward + backward time,
and the largest difference of outputs and input gradients on the real tokens.

Run one at a time from a clone: OMP_NUM_THREADS=1 python tools/bench_memory.py [--section head|attention]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _checkpoint(out: Path, layers: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def bench_head(layers: int, tokens: int) -> dict[str, float]:
    from megaent.config.schema import LossConfig
    from megaent.model import load_hf
    from megaent.parallel import init_parallel
    from megaent.trainer.batching import TrainSample, pack
    from megaent.trainer.mcore_engine import build_engine
    from megaent.trainer.memtrack import PeakMemory
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(1, 1)
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        hf = _checkpoint(Path(d) / "hf", layers)
        g = torch.Generator().manual_seed(0)
        per = 256
        samples = [TrainSample(tokens=torch.randint(0, 151936, (per,), generator=g), prompt_len=32,
                               advantage=float(torch.randn(1, generator=g)), uid=i) for i in range(tokens // per)]
        for name, fused in (("full", False), ("fused", True)):
            pol = load_hf(hf, st, engine="mcore")
            eng = build_engine(pol, st, lr=1e-6)
            eng.fused_head = fused
            mbs = [pack(samples, share_prefix=False).to(st.device)]

            def step() -> None:
                compute_logprobs(eng, mbs, state=st, fill_old=True)
                train_mini_batch(eng, mbs, loss_cfg=LossConfig(), state=st)

            with PeakMemory() as pm:
                step()  # Adam's moments exist after it
                pm.reset_peak()
                base = pm.current
                step()
            t0 = time.perf_counter()
            step()
            res[name] = {"peak": pm.peak, "transient": pm.peak - base, "time": time.perf_counter() - t0}
            print(f"{name:>5}: peak {pm.peak / 2**30:.2f} GiB (persistent {base / 2**30:.2f} GiB, transient "
                  f"{(pm.peak - base) / 2**30:.2f} GiB), step {res[name]['time']:.1f} s", flush=True)
            del eng, pol, pm
    f, b = res["fused"], res["full"]
    out = {"peak_ratio": f["peak"] / b["peak"], "transient_ratio": f["transient"] / b["transient"],
           "time_ratio": f["time"] / b["time"]}
    print(f"fused / full: peak {out['peak_ratio']:.3f} (target <= 0.3), transient {out['transient_ratio']:.3f}, "
          f"step time {out['time_ratio']:.3f} (target <= 1.3)")
    return out


def bench_attention(n_short: int, heads: int = 4, kv: int = 2, dim: int = 64) -> dict[str, float]:
    import torch.nn.functional as F
    from megatron.core.packed_seq_params import PackedSeqParams

    from megaent.model.gpt import PackedCoreAttention

    lens = [4096] + [256] * n_short
    total, lmax = sum(lens), max(lens)
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(total, h, dim, generator=g) for h in (heads, kv, kv))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=lmax, max_seqlen_kv=lmax)

    class Cfg:
        attention_dropout, kv_channels, hidden_size, num_attention_heads = 0.0, dim, heads * dim, heads

    attn = PackedCoreAttention(Cfg(), 1, None)
    go = torch.randn(total, heads * dim, generator=g)

    def packed():
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = attn(q, k, v, None, packed_seq_params=psp)
        out.backward(go)
        return out.detach(), [t.grad for t in (q, k, v)]

    def padded():  # every segment padded at its end to L_max (causal: real tokens never see the padding)
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        pads = []
        for t in (q, k, v):
            rows = [F.pad(t[a:b], (0, 0, 0, 0, 0, lmax - (b - a))) for a, b in zip(cu[:-1], cu[1:])]
            pads.append(torch.stack(rows).transpose(1, 2))  # [n_seg, heads, L_max, D]
        o = F.scaled_dot_product_attention(*pads, is_causal=True, scale=dim ** -0.5, enable_gqa=True)
        o = o.transpose(1, 2)  # [n_seg, L_max, heads, D]
        out = torch.cat([o[i, :b - a] for i, (a, b) in enumerate(zip(cu[:-1], cu[1:]))]).reshape(total, -1)
        out.backward(go)
        return out.detach(), [t.grad for t in (q, k, v)]

    times, outs = {}, {}
    for name, fn in (("packed", packed), ("padded", padded)):
        fn()  # warm-up
        t0 = time.perf_counter()
        outs[name] = fn()
        times[name] = time.perf_counter() - t0
    dv = (outs["packed"][0] - outs["padded"][0]).abs().max().item()
    dg = max((a - b).abs().max().item() for a, b in zip(outs["packed"][1], outs["padded"][1]))
    ratio = times["packed"] / times["padded"]
    print(f"attention, 1 x 4096 + {n_short} x 256 tokens ({heads} heads, {kv} KV, D {dim}), forward + backward: "
          f"packed {times['packed']:.2f} s, padded {times['padded']:.2f} s, ratio {ratio:.3f} (target <= 0.3); "
          f"max |diff| values {dv:.2e}, grads {dg:.2e}")
    return {"time_ratio": ratio, "value_diff": dv, "grad_diff": dg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=["head", "attention", "all"], default="all")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 0.5B-shaped policy (2-4)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the step's one micro-batch")
    ap.add_argument("--short", type=int, default=32, help="256-token segments beside the 4096-token one")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.section in ("head", "all"):
        bench_head(args.layers, args.tokens)
    if args.section in ("attention", "all"):
        bench_attention(args.short)


if __name__ == "__main__":
    main()
