"""The MoE load-balancing loss in megaent's RL update (`megaent.trainer.update.train_mini_batch`) vs `transformers`.

A tiny random Qwen3-MoE checkpoint (tests/test_model_families.py's) with `output_router_logits=true` and
`router_aux_loss_coef=0.5` in config.json; two samples of equal length, one per packed micro-batch (HF computes
the aux loss per forward). One spawned gloo rank (tests/dist.py) runs the update on megatron-core's engine:
- moe/aux_loss equals the mean over the samples of HF's `aux_loss` (transformers' `load_balancing_loss_func`),
  moe/router_entropy the mean per-token entropy of HF's router softmax over layers;
- with all advantages 0 the policy loss has no gradient, so the update's grad norm is that of
  router_aux_loss_coef x the mean aux loss, as HF autograd gives it; with output_router_logits=false (HF adds
  no aux loss) the grad norm is 0 and the metrics are still logged.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from test_model_families import V, make_family_hf

COEF = 0.5
L = 10


def _samples():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(4, V, (L,), generator=g) for _ in range(2)]


def _spawned(rank: int, world: int, hf_dirs: tuple[str, str]) -> list[dict]:
    from megaent.config.schema import LossConfig
    from megaent.model import load_hf
    from megaent.parallel import init_parallel
    from megaent.trainer.batching import TrainSample, make_micro_batches
    from megaent.trainer.mcore_engine import build_engine
    from megaent.trainer.update import train_mini_batch

    st = init_parallel(1, 1)
    out = []
    for hf_dir in hf_dirs:  # one process for both checkpoints (one megatron import)
        policy = load_hf(hf_dir, st, engine="mcore")
        engine = build_engine(policy, st, lr=0.0, clip_grad=0.0)
        samples = [TrainSample(tokens=t, prompt_len=3, advantage=0.0, group=k, uid=k)
                   for k, t in enumerate(_samples())]
        mbs = make_micro_batches(samples, max_tokens=L, share_prefix=False, device=st.device)
        assert len(mbs) == 2
        out.append(train_mini_batch(engine, mbs, loss_cfg=LossConfig(), state=st, old_from_current=True))
    return out


def _hf_reference(hf_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    auxes, ents = [], []
    for t in _samples():
        out = model(t[None], output_router_logits=True)
        auxes.append(out.aux_loss)
        logits = torch.cat([r.reshape(-1, r.shape[-1]) for r in out.router_logits]).float()
        ents.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean())
    aux = torch.stack(auxes).mean()
    (COEF * aux).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return dict(aux=float(aux), entropy=float(torch.stack(ents).mean()), norm=float(norm))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_aux")
    on = make_family_hf(root / "on", "qwen3_moe", output_router_logits=True, router_aux_loss_coef=COEF)
    off = root / "off"
    off.mkdir()
    for f in on.iterdir():
        (off / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((off / "config.json").read_text())
    cfg["output_router_logits"] = False
    (off / "config.json").write_text(json.dumps(cfg))
    return str(on), str(off)


@pytest.mark.slow
def test_aux_loss_and_router_entropy_in_the_update_match_hf(hf_dirs):
    on, off = hf_dirs
    ref = _hf_reference(on)
    assert ref["norm"] > 1e-4  # the aux loss does move the routers
    got_on, got_off = run_ranks(_spawned, 1, (on, off))[0]
    for got in (got_on, got_off):
        assert abs(got["moe/aux_loss"] - ref["aux"]) <= 1e-5, (got["moe/aux_loss"], ref["aux"])
        assert abs(got["moe/router_entropy"] - ref["entropy"]) <= 1e-5
    assert abs(got_on["grad_norm"] - ref["norm"]) <= 1e-5 * max(1.0, ref["norm"]), (got_on["grad_norm"], ref)
    assert got_off["grad_norm"] == 0.0
