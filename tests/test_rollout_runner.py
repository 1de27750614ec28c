"""DecodeRunner (the embedded engine's inference forward) against the training forward of the same Policy.

Reference: `Policy.forward` (megatron-core layers, full attention mask), itself checked against `transformers`
in tests/test_model_parity.py. Checks, for a Qwen2 (QKV bias, tied head) and a Llama tiny model, with and
without prepacked oneDNN weights:
- prefill of left-padded prompts + 5 decode steps through a KV cache give the last-position logits of a full
  forward over the whole sequence (<= 2e-5);
- rows without padding (key_mask None) give the same logits as with an all-True mask;
- after an in-place weight change (what an optimizer step does) the runner decodes the new weights;
- prepack=True on a torch build without oneDNN is a clear error, and auto mode falls back to F.linear;
- a bf16 policy (no prepacking, the model's own RMSNorm) matches its bf16 training forward to a few ulps.
TP = 2 is covered by tests/test_rollout_engine.py (the engine decodes through this runner).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_runner.py
"""
import pytest
import torch

from hf_tiny import make_tiny_hf

from megaent.model.cache import new_kv_cache
from megaent.rollout.runner import DecodeRunner, onednn_prepack_available


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def policy(request, tmp_path_factory):
    from megaent.model import load_hf
    from megaent.parallel import init_parallel

    d = make_tiny_hf(tmp_path_factory.mktemp(request.param) / "m", request.param, vocab_size=300, layers=2, seed=5)
    return load_hf(str(d), init_parallel(1, 1), dtype=torch.float32)


def _reference_last_logits(policy, ids, mask):
    """Full forward over the whole (left-padded) sequence; logits of the last position [B, V]."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return policy(ids, pos, attention_mask=mask)[:, -1]


def _decode(runner, policy, prompts, steps, *, masked=True):
    """Prefill left-padded prompts, then greedy-decode `steps` tokens; returns ids [B, P+steps], mask, logits."""
    b, p = len(prompts), max(len(x) for x in prompts)
    ids = torch.zeros(b, p, dtype=torch.long)
    mask = torch.zeros(b, p + steps, dtype=torch.bool)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):p] = True
    cache = new_kv_cache(policy, b, p + steps)
    pos = (mask[:, :p].long().cumsum(-1) - 1).clamp(min=0)
    logits = runner.last_logits(ids, pos, key_mask=mask[:, :p] if masked else None, cache=cache)
    out = [ids]
    next_pos = mask[:, :p].sum(-1)
    for t in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        mask[:, p + t] = True
        logits = runner.last_logits(tok, next_pos[:, None], key_mask=mask[:, :p + t + 1] if masked else None,
                                    cache=cache)
        next_pos = next_pos + 1
    return torch.cat(out, 1), mask, logits


@pytest.mark.parametrize("prepack", [False, True])
def test_runner_matches_training_forward(policy, prepack):
    if prepack and not onednn_prepack_available():
        pytest.skip("this torch build has no oneDNN prepacked linear")
    assert DecodeRunner.supports(policy)  # the engine decodes local-layer policies through this runner
    runner = DecodeRunner(policy, prepack=prepack)
    ids, mask, logits = _decode(runner, policy, [[5, 17, 33, 8], [40, 41], [7, 9, 60, 61, 62, 11], [99]], 5)
    ref = _reference_last_logits(policy, ids, mask)
    torch.testing.assert_close(logits, ref, rtol=0, atol=2e-5)
    # Equal-length prompts: no mask at all gives the masked result.
    same = [[5, 17, 33], [40, 41, 42]]
    _, _, a = _decode(runner, policy, same, 3, masked=True)
    _, _, b = _decode(runner, policy, same, 3, masked=False)  # (unmasked decode steps: the matmul attention)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_runner_follows_in_place_weight_updates(policy):
    runner = DecodeRunner(policy)
    prompts = [[5, 17, 33, 8], [40, 41]]
    _, _, before = _decode(runner, policy, prompts, 2)
    saved = {n: p.detach().clone() for n, p in policy.named_parameters()}
    try:
        with torch.no_grad():
            for p in policy.parameters():  # what an optimizer step does: in place, same storage
                p.add_(torch.randn_like(p) * 0.05)
        ids, mask, after = _decode(runner, policy, prompts, 2)
        assert (after - before).abs().max() > 1e-3, "the runner kept decoding the old weights"
        torch.testing.assert_close(after, _reference_last_logits(policy, ids, mask), rtol=0, atol=2e-5)
    finally:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                p.copy_(saved[n])


def test_prepack_without_onednn_is_a_clear_error(policy, monkeypatch):
    import megaent.rollout.runner as runner_mod

    monkeypatch.setattr(runner_mod, "onednn_prepack_available", lambda: False)  # a torch build without MKLDNN
    with pytest.raises(RuntimeError, match="prepack=False"):
        DecodeRunner(policy, prepack=True)
    assert DecodeRunner(policy).prepack is False  # auto falls back to F.linear


def test_runner_bf16_matches_training_forward(tmp_path):
    """bf16 policy: the runner keeps the model's RMSNorm module (fp32 inside) and plain GEMMs, no prepacking."""
    from megaent.model import load_hf
    from megaent.parallel import init_parallel

    d = make_tiny_hf(tmp_path / "m", "qwen2", vocab_size=300, layers=2, seed=5)
    policy = load_hf(str(d), init_parallel(1, 1), dtype=torch.bfloat16)
    runner = DecodeRunner(policy)
    assert runner.prepack is False
    ids, mask, logits = _decode(runner, policy, [[5, 17, 33, 8], [40, 41], [7, 9, 60, 61, 62, 11], [99]], 5)
    ref = _reference_last_logits(policy, ids, mask)
    assert logits.dtype == torch.bfloat16
    # Same bf16 ops up to summation order: a few bf16 ulps at the logits' scale (|logit| < 4, ulp 1/64).
    torch.testing.assert_close(logits.float(), ref.float(), rtol=0, atol=0.05)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
