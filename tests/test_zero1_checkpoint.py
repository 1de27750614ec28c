"""Checkpoints with ZeRO-1 (optimizer state sharded over DP) save and load across layouts.

Reference: the same optimizer step computed without ZeRO-1 on the loading layout itself. A tiny Qwen2 policy
(`build_policy`, identical on every layout) takes one AdamW step with gradients that are a fixed function of
the parameters (so every layout sees the same full gradient, as after the DP all-reduce), in bf16 with fp32
masters. The ZeRO-1 run (TP=2 x DP=2, world 4) writes a checkpoint; then
- TP=2 x DP=1 without ZeRO-1 and TP=1 x DP=2 with ZeRO-1 load it, and their params, fp32 masters and Adam
  moments equal a plain (no ZeRO-1) step on their own layout; one more step after the load also matches.
Equality is bitwise except where TP changes the grad-norm summation order (TP=1): 1e-6 relative there.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_zero1_checkpoint.py
"""
import pytest
import torch

from dist import run_ranks


def _setup(tp, zero1, seed=0):
    from megaent.config.schema import OptimizerConfig
    from megaent.model import build_policy
    from megaent.model.arch import ModelArch
    from megaent.parallel import init_parallel
    from megaent.trainer.optimizer import build_optimizer

    st = init_parallel(tp, 1)
    arch = ModelArch(model_type="qwen2", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                     rope_theta=10000.0, rope_type="default", rope_scaling={}, qkv_bias=True,
                     tie_word_embeddings=True, max_position_embeddings=128, dtype=None, hf_config={})
    policy = build_policy(arch, st, dtype=torch.bfloat16, seed=seed)
    opt = build_optimizer(policy, cfg=OptimizerConfig(lr=1e-2, grad_clip=1.0, zero1=zero1), state=st)
    return st, policy, opt


def _step(policy, opt):
    for p in policy.parameters():  # the same full gradient on every layout
        p.grad = (p.detach().float() * 0.5 + 0.01).to(p.dtype)
    policy.embed.weight.grad[policy.local_vocab_valid:] = 0  # TP vocab padding rows: never used, never trained
    opt.step()
    opt.zero_grad()


def _snapshot(policy, opt):
    """Per HF part: the live param, the fp32 master (if any) and Adam moments (if any) of this rank."""
    from megaent.trainer.state_dict import canonical_state

    out = {f"param.{n}": p.detach().float().clone() for n, p in policy.named_parameters()}
    for k, v in canonical_state(policy, opt, policy.state, loading=False).items():
        out[k] = v.to_local().float().clone()
    return out


def _save_zero1(rank, world, path):
    from megaent.parallel import destroy_parallel
    from megaent.trainer.checkpoint import save_checkpoint
    from megaent.trainer.state_dict import canonical_state

    st, policy, opt = _setup(2, True)
    assert opt.zero1 and 0 < len(opt.owned) < len(opt.params)
    _step(policy, opt)
    save_checkpoint(path, 1, canonical_state(policy, opt, st, loading=False), {}, rank=st.rank)
    destroy_parallel()


def _load_and_compare(rank, world, path, tp, zero1):
    from megaent.parallel import destroy_parallel
    from megaent.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from megaent.trainer.state_dict import canonical_state, finish_load

    st, ref_policy, ref_opt = _setup(tp, False)
    _step(ref_policy, ref_opt)  # reference: the step done here, without ZeRO-1
    ref = _snapshot(ref_policy, ref_opt)
    _, policy, opt = _setup(tp, zero1, seed=1)  # other weights: everything must come from the checkpoint
    load_checkpoint(latest_checkpoint(path), canonical_state(policy, opt, st, loading=True), rank=st.rank,
                    restore_rng=False)
    finish_load(policy, opt, step=1)
    got = _snapshot(policy, opt)
    tol = dict(rtol=0, atol=0) if tp == 2 else dict(rtol=1e-6, atol=1e-7)
    errors = []
    for k, v in got.items():  # a ZeRO-1 rank holds a subset of the reference's keys
        try:
            torch.testing.assert_close(v, ref[k], **tol)
        except AssertionError as e:
            errors.append(f"{k}: {str(e).splitlines()[0]}")
    _step(ref_policy, ref_opt)
    _step(policy, opt)
    for n, p in policy.named_parameters():
        try:
            torch.testing.assert_close(p.float(), dict(ref_policy.named_parameters())[n].float(), **tol)
        except AssertionError as e:
            errors.append(f"after one more step, {n}: {str(e).splitlines()[:4]}")
    n_moments = sum(k.startswith("optim.") for k in got)
    destroy_parallel()
    return errors, n_moments


@pytest.mark.slow
def test_zero1_checkpoint_loads_into_other_layouts(tmp_path):
    run_ranks(_save_zero1, 4, str(tmp_path))
    for tp, zero1, world in [(2, False, 2), (1, True, 2)]:
        results = run_ranks(_load_and_compare, world, str(tmp_path), tp, zero1)
        for errors, n_moments in results:
            assert not errors, f"tp={tp} zero1={zero1}: " + "; ".join(errors[:5])
            assert n_moments > 0
