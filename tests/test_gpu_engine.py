"""megatron-core's engine on a CUDA GPU (`pytest -m gpu`; skipped without one): the trainer's own code path.

- one Clip-Cov update of a tiny Qwen2 through the trainer's `load_policy` / `build_engine` (GPTModel in bf16 with
  fp32 main parameters, megatron-core DDP and optimizer) on micro-batches on the GPU: the log-probs track HF
  `transformers` in fp32 on the CPU (bf16 tolerance), the update is finite and moves the weights, and the
  exported weights stay bf16 with an fp32-master update that differs from a bare bf16 step;
- with Transformer Engine installed: the TE layer spec in bf16, and FP8 through `TransformerConfig` (delayed and
  tensorwise recipes) on a token count that is not a multiple of 16, against the local spec (FP8 tolerance);
- `megaent train configs/demo.yaml` for 2 steps in bf16 on the GPU, through the console script.
The same functions run on CPU in tests/test_update_layouts.py's layouts (fp32, 1e-5); here only the device and
the precision change.
Run on a GPU machine: python -m pytest -m gpu tests/test_gpu_engine.py -q
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from hf_tiny import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
pytestmark = pytest.mark.gpu


def _data(n: int = 8, vocab: int = 1001) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        L = int(torch.randint(9, 21, (1,), generator=g))  # odd totals: FP8's row padding is exercised
        out.append(dict(tokens=torch.randint(4, vocab, (L,), generator=g), prompt_len=3, group=k // 2, uid=k,
                        advantage=float(torch.randn(1, generator=g))))
    return out


def _engine_update(rank, world, hf_dir, data, model_kw):
    from megaent.config.schema import LossConfig, ModelConfig, OptimizerConfig
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.batching import TrainSample, make_micro_batches
    from megaent.trainer.components import build_engine, load_policy
    from megaent.trainer.update import compute_logprobs, train_mini_batch

    st = init_parallel(1, 1)
    try:
        policy = load_policy(ModelConfig(**model_kw), Path(hf_dir), state=st)
        engine = build_engine(policy, OptimizerConfig(lr=1e-3), state=st)
        samples = [TrainSample(tokens=d["tokens"], prompt_len=d["prompt_len"], advantage=d["advantage"],
                               group=d["group"], uid=d["uid"]) for d in data]
        mbs = make_micro_batches(samples, max_tokens=64, share_prefix=False, device=st.device)
        assert all(mb.input_ids.device == st.device for mb in mbs)
        lps = compute_logprobs(engine, mbs, state=st, fill_old=True, samples=samples)
        before = {n: p.detach().float().cpu().clone() for n, p in policy.named_parameters()}
        stats = train_mini_batch(engine, mbs, loss_cfg=LossConfig(policy_loss="clip_cov"), state=st,
                                 generator=torch.Generator().manual_seed(0))
        moved = max(float((p.detach().float().cpu() - before[n]).abs().max()) for n, p in policy.named_parameters())
        return dict(lps={u: lp.float().cpu() for u, (lp, _) in lps.items()}, stats=stats, moved=moved,
                    device=str(st.device), dtypes={str(p.dtype) for p in policy.parameters()})
    finally:
        destroy_parallel()


def _hf_logprobs(hf_dir, data) -> dict[int, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = {}
    with torch.no_grad():
        for d in data:
            ids = d["tokens"][None]
            lp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            out[d["uid"]] = lp[d["prompt_len"] - 1:]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device machine)")
    d = tmp_path_factory.mktemp("gpu")
    return str(make_tiny_hf(d / "hf", family="qwen2", hidden=128, layers=2, heads=4, kv_heads=2, seed=1))


def test_bf16_update_on_the_gpu_tracks_hf_fp32(tiny):
    data = _data()
    got = run_ranks(_engine_update, 1, tiny, data, dict(dtype="bfloat16", precision="bf16"))[0]
    assert got["device"].startswith("cuda") and got["dtypes"] == {"torch.bfloat16"}
    ref = _hf_logprobs(tiny, data)
    for uid, lp in got["lps"].items():
        assert (lp - ref[uid]).abs().max() < 0.1, uid  # bf16 logits over a 1001-token vocabulary
    s = got["stats"]
    assert s["skipped"] == 0.0 and 0 < s["grad_norm"] < float("inf") and got["moved"] > 0


@pytest.mark.skipif(not HAS_TE, reason="Transformer Engine not installed (pip install 'megaent[gpu]')")
@pytest.mark.parametrize("kw", [dict(backend="te", precision="bf16"),
                                dict(backend="te", precision="fp8", fp8_recipe="delayed"),
                                dict(backend="te", precision="fp8", fp8_recipe="current")],
                         ids=["te-bf16", "te-fp8-delayed", "te-fp8-current"])
def test_te_spec_and_fp8_track_the_local_spec(tiny, kw):
    data = _data()
    ref = run_ranks(_engine_update, 1, tiny, data, dict(dtype="bfloat16", precision="bf16"))[0]
    got = run_ranks(_engine_update, 1, tiny, data, dict(dtype="bfloat16", **kw))[0]
    tol = 0.1 if kw["precision"] == "bf16" else 0.5
    for uid, lp in got["lps"].items():
        assert (lp - ref["lps"][uid]).abs().mean() < tol, (kw, uid)
    assert got["stats"]["skipped"] == 0.0 and got["moved"] > 0


def test_demo_trains_on_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device machine)")
    exe = shutil.which("megaent") or sys.executable
    cmd = [exe] if exe.endswith("megaent") else [exe, "-m", "megaent.cli"]
    out = subprocess.run([*cmd, "train", "configs/demo.yaml", "trainer.steps=2", f"trainer.run_dir={tmp_path}/r",
                          "model.dtype=bfloat16", "model.precision=bf16", "trainer.quiet=true"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count("\n") >= 2
