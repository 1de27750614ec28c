"""The peer benchmark compares equal work: megaent's GRPO update has the gradient of the plain GRPO loss.

Reference (written here, no megaent code): the HF `transformers` Qwen2 model on a right-padded batch,
fp32 `log_softmax`, group-std GRPO advantages (r - mean) / (std + 1e-6) per group of G samples, the
token-mean surrogate -sum(A * exp(logp - logp.detach()) * mask) / sum(mask) over the whole batch (ratio 1,
so PPO clipping never acts), `loss.backward()`. This is what TRL's GRPOTrainer computes with
loss_type="dapo", beta=0 and num_iterations=1 (tools/bench_peer.py).
megaent (one gloo rank, megatron-core's engine): `load_hf(engine="mcore")` -> `make_micro_batches` (several
packed micro-batches) ->
`train_mini_batch` (PPO, token_mean) on both paths: old log-probs from `compute_logprobs`, and the on-policy
path (`old_from_current=True`, the trainer's path for one update per rollout). megatron-core DDP's fp32 main
gradients are read after the update (lr 0); `save_hf` maps them to HF names. Checks: every parameter's gradient within 1e-5 relative
(per-tensor norm of the difference over the reference norm; fp32 round-off is ~1e-7), and the on-policy
path's recorded log-probs / entropy equal `compute_logprobs`'.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_peer_equivalence.py   (about 15 s)
"""
from __future__ import annotations

import torch

from dist import run_ranks

G, N_GROUPS, VOCAB = 4, 2, 1001


def make_batch(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(N_GROUPS * G):
        p = int(torch.randint(3, 6, (1,), generator=gen))
        L = p + int(torch.randint(5, 12, (1,), generator=gen))
        out.append(dict(tokens=torch.randint(4, VOCAB, (L,), generator=gen), prompt_len=p, group=k // G, uid=k,
                        reward=float(torch.rand(1, generator=gen))))
    r = torch.tensor([d["reward"] for d in out]).view(N_GROUPS, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(-1)
    for d, a in zip(out, adv.tolist()):
        d["advantage"] = a
    return out


def reference_grads(hf_dir: str, batch: list[dict]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    L = max(len(d["tokens"]) for d in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    att = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L - 1)
    adv = torch.zeros(len(batch), L - 1)
    for b, d in enumerate(batch):
        n, p = len(d["tokens"]), d["prompt_len"]
        ids[b, :n], att[b, :n] = d["tokens"], 1
        mask[b, p - 1:n - 1] = 1.0  # position i predicts token i + 1: response targets only
        adv[b] = d["advantage"]
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    loss = -(adv * torch.exp(lp - lp.detach()) * mask).sum() / mask.sum()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _megaent(rank, world, hf_dir, batch, out_dir):
    from safetensors.torch import load_file

    from megaent.config.schema import LossConfig
    from megaent.model import load_hf, save_hf
    from megaent.parallel import init_parallel
    from megaent.trainer.batching import TrainSample, make_micro_batches
    from megaent.trainer.mcore_engine import build_engine
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(1, 1)
    policy = load_hf(hf_dir, st, engine="mcore")
    engine = build_engine(policy, st, lr=0.0, clip_grad=0.0)  # lr 0: the step keeps the weights
    named = dict(policy.named_parameters())
    cfg = LossConfig(policy_loss="ppo", loss_agg="token_mean")
    res = {}
    for path in ("explicit_old", "on_policy"):
        samples = [TrainSample(tokens=d["tokens"], prompt_len=d["prompt_len"], advantage=d["advantage"],
                               group=d["group"], uid=d["uid"]) for d in batch]
        mbs = [mb.to(st.device) for mb in make_micro_batches(samples, max_tokens=40, dp_group=st.dp_group,
                                                              share_prefix=False)]
        if path == "explicit_old":
            compute_logprobs(engine, mbs, state=st, fill_old=True, samples=samples)
        train_mini_batch(engine, mbs, loss_cfg=cfg, state=st, old_from_current=path == "on_policy")
        # megatron-core DDP's fp32 main gradients (kept until the next update zeroes them)
        grads = [named[policy.mcore_name(spec.name)].main_grad.detach().clone() for spec in policy.param_specs()]
        params = [named[policy.mcore_name(spec.name)] for spec in policy.param_specs()]
        with torch.no_grad():  # write the gradients into the weights, so save_hf names them as HF does
            saved = [p.detach().clone() for p in params]
            for p, g in zip(params, grads):
                p.copy_(g)
            save_hf(policy, st, f"{out_dir}/{path}")
            for p, w in zip(params, saved):
                p.copy_(w)
        import glob

        out = {}
        for f in glob.glob(f"{out_dir}/{path}/*.safetensors"):
            out.update(load_file(f))
        res[path] = dict(grads=out, n_mb=len(mbs), lp=[mb.logprobs.clone() for mb in mbs],
                         ent=[mb.entropy.clone() for mb in mbs])
    return res


def test_megaent_grpo_gradient_matches_plain_reference(tmp_path):
    from hf_tiny import make_tiny_hf

    hf_dir = str(make_tiny_hf(tmp_path / "hf", family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2,
                              vocab_size=VOCAB, weight_std=0.05, seed=3))
    batch = make_batch()
    ref = reference_grads(hf_dir, batch)
    res = run_ranks(_megaent, 1, hf_dir, batch, str(tmp_path))[0]
    assert res["explicit_old"]["n_mb"] > 1, "the batch must span several packed micro-batches"
    for path in ("explicit_old", "on_policy"):
        grads = res[path]["grads"]
        assert set(grads) >= {k for k in ref if k != "lm_head.weight"}, path  # tied: lm_head is embed_tokens
        for name, g_ref in ref.items():
            if name == "lm_head.weight":
                continue
            rel = float((grads[name] - g_ref).norm() / g_ref.norm().clamp(min=1e-12))
            assert rel <= 1e-5, (path, name, rel)
    for a, b in zip(res["explicit_old"]["lp"] + res["explicit_old"]["ent"],
                    res["on_policy"]["lp"] + res["on_policy"]["ent"]):
        assert (a - b).abs().max() < 1e-5
