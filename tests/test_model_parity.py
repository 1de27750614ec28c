"""Policy logits/gradients vs HuggingFace `transformers` at TP x PP layouts; packing, KV cache, save/load.

One 4-rank gloo spawn (tests/dist.py) loads two tiny random checkpoints from
tests/hf_tiny.py -- Qwen2 (GQA, QKV bias, tied embeddings) and Llama (untied,
llama3 RoPE scaling), both with vocab 1001 so TP=2 pads the vocabulary -- at
TP=1, TP=2, PP=2 and TP=2 x PP=2 (DP fills the rest of the 4 ranks). Stages
pass hidden states with send/recv; logits are gathered over TP. Everything in
the spawn runs with every megatron-core `parallel_state.get_*` getter patched to
raise, proving megaent.model only uses the groups it is given.

References (computed in this process with `transformers`, float32):
- logits of the full model (<= 1e-5 max abs);
- packed sequences vs each sample run alone through HF;
- KV-cache decoding of a left-padded batch vs HF on each unpadded sequence;
- gradients (TP=2, activation checkpointing on) vs HF autograd of the same loss;
- `save_hf` after `load_hf` at TP=2 x PP=2: every tensor bit for bit equal to the
  source checkpoint, and `AutoModelForCausalLM.from_pretrained` on it gives the
  reference logits; a sharded save (index.json) loads back through `load_hf`;
- `build_policy` gives the same model whatever the layout (vs its TP=1 result).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_model_parity.py -q
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from hf_tiny import make_tiny_hf

V = 1001
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = {
    "qwen2": dict(family="qwen2"),
    "llama": dict(family="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}
PACK_LENS = [4, 6, 3]
PROMPTS = [5, 3]  # KV test: prompt lengths (the second is left-padded by 2)
N_NEW = 3
TOL = 1e-5


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=g)
    ids[0, 3] = V - 1  # the last real token lives in the last TP shard, next to the padding
    pack = [torch.randint(0, V, (n,), generator=g) for n in PACK_LENS]
    seqs = [torch.randint(0, V, (n + N_NEW,), generator=g) for n in PROMPTS]
    return {"ids": ids, "pack": pack, "seqs": seqs, "loss_w": torch.randn(2, 9, V, generator=g)}


# ---------------------------------------------------------------------------------------------- spawned side
@contextlib.contextmanager
def _megatron_getters_raise():
    """Replace every megatron.core.parallel_state.get_* (wherever imported) by a function that raises."""
    from megatron.core import parallel_state as mps

    getters = {id(f): n for n, f in vars(mps).items() if n.startswith("get_") and callable(f)}
    patched = []

    def raiser(name):
        def f(*args, **kwargs):
            raise AssertionError(f"megaent.model called megatron.core.parallel_state.{name}")
        return f

    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("megatron") and m is not None]:
        for attr, val in list(vars(mod).items()):
            if id(val) in getters:
                patched.append((mod, attr, val))
                setattr(mod, attr, raiser(attr))
    try:
        yield
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


def _gather_vocab(x: torch.Tensor, st) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(st.tp)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


def _stage_forward(policy, st, ids: torch.Tensor, **kw):
    """Forward through all stages (send/recv over the pipeline); full padded logits on the last stage."""
    import torch.distributed as dist

    x = None
    if not st.is_first_stage:
        x = torch.empty(*ids.shape, policy.arch.hidden_size, dtype=policy.dtype)
        dist.recv(x, src=st.prev_stage_rank())
    out = policy(ids if st.is_first_stage else None, hidden_states=x, **kw)
    if not st.is_last_stage:
        dist.send(out.contiguous(), dst=st.next_stage_rank())
        return None
    return _gather_vocab(out, st)


def _strip(full: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Real-vocab logits and whether every padded entry equals finfo.min."""
    return full[..., :V], bool((full[..., V:] == torch.finfo(full.dtype).min).all())


def _kv_decode(policy, st, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill a left-padded batch, then feed N_NEW tokens one at a time; logits at each real position."""
    from megaent.model import new_kv_cache

    p = max(PROMPTS)
    ids = torch.zeros(len(seqs), p, dtype=torch.long)
    mask = torch.zeros(len(seqs), p, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(seqs, PROMPTS)):
        ids[b, p - n:], mask[b, p - n:] = s[:n], True
    cache = new_kv_cache(policy, len(seqs), p + N_NEW)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    steps = [_stage_forward(policy, st, ids, position_ids=pos, attention_mask=mask, kv_cache=cache)]
    for t in range(N_NEW):
        mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.bool)], dim=1)
        pos = pos[:, -1:] + 1
        new = torch.stack([s[n + t] for s, n in zip(seqs, PROMPTS)])[:, None]
        steps.append(_stage_forward(policy, st, new, position_ids=pos, attention_mask=mask, kv_cache=cache))
    if steps[0] is None:
        return []
    out = []
    for b, n in enumerate(PROMPTS):  # per sample: [n + N_NEW, V] at its real positions
        rows = [steps[0][b, p - n:]] + [s[b] for s in steps[1:]]
        out.append(torch.cat(rows, dim=0)[..., :V])
    return out


def _grads(policy, st, ids, loss_w) -> dict[str, torch.Tensor] | None:
    """d/dparams of sum(logits * loss_w) (loss split over vocab shards: no collective needed in the loss)."""
    import torch.distributed as dist

    from megaent.model import megaent_to_hf

    logits = policy(ids)
    w = torch.zeros(*ids.shape, policy.padded_vocab_size)
    w[..., :V] = loss_w
    a, b = policy.vocab_range
    (logits * w[..., a:b]).sum().backward()
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(st.tp)]
    for name, prm in policy.named_parameters():
        parts = [torch.empty_like(prm.grad) for _ in range(st.tp)]
        dist.all_gather(parts, prm.grad.contiguous(), group=st.tp_group)
        for r in range(st.tp):
            per_rank[r][name] = parts[r]
    return megaent_to_hf(per_rank, policy.arch)


def _spawned(rank: int, world: int, dirs: dict[str, str], out_dir: str, inp: dict) -> dict:
    from megaent.model import ModelArch, build_policy, load_hf, save_hf
    from megaent.parallel import init_parallel
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    res: dict = {}
    for fam, hf_dir in dirs.items():
        for tp, pp in LAYOUTS:
            st = init_parallel(tp, pp)
            rec = st.is_last_stage and st.tp_rank == 0 and st.dp_rank == 0
            with _megatron_getters_raise():
                with pytest.raises(AssertionError, match="parallel_state"):
                    get_tensor_model_parallel_group_if_none(None)  # the patch is live
                # PP=2 without TP uses an uneven explicit split; TP=2 x PP=2 the default even split.
                pol = load_hf(hf_dir, st, pipeline_layers=[3, 1] if (tp, pp) == (1, 2) else None)
                full = _stage_forward(pol, st, inp["ids"])
                packed = torch.cat(inp["pack"])[None]
                seg = torch.cat([torch.full((n,), i) for i, n in enumerate(PACK_LENS)])[None]
                pos = torch.cat([torch.arange(n) for n in PACK_LENS])[None]
                pk = _stage_forward(pol, st, packed, position_ids=pos, segment_ids=seg)
                kv = _kv_decode(pol, st, inp["seqs"])
                frozen = build_policy(ModelArch.from_hf_dir(hf_dir), st, seed=5).requires_grad_(False)
                rnd = _stage_forward(frozen, st, inp["ids"])  # frozen weights take megatron's other matmul path
                if rec:
                    logits, pad_ok = _strip(full)
                    res[(fam, tp, pp)] = dict(logits=logits, pad_ok=pad_ok, packed=_strip(pk)[0][0], kv=kv,
                                              random=_strip(rnd)[0], padded=pol.padded_vocab_size,
                                              layers=pol.layer_ids, shared=[n for n, p in pol.named_parameters()
                                                                            if getattr(p, "shared_embedding", 0)])
                if (tp, pp) == (2, 1):
                    g = _grads(load_hf(hf_dir, st, activation_checkpointing=True), st, inp["ids"], inp["loss_w"])
                    if rank == 0:
                        res[(fam, "grads")] = g
                if (tp, pp) == (2, 2):
                    save_hf(pol, st, f"{out_dir}/{fam}")
                    save_hf(pol, st, f"{out_dir}/{fam}_sharded", max_shard_bytes=150_000)
                    again = _stage_forward(load_hf(f"{out_dir}/{fam}_sharded", st), st, inp["ids"])
                    if rec:
                        res[(fam, "reloaded")] = _strip(again)[0]
    return res


# ------------------------------------------------------------------------------------------------ test side
@functools.lru_cache(maxsize=4)
def _hf_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def _hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(Path(hf_dir))(ids).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("model_parity")
    dirs = {fam: str(make_tiny_hf(base / fam, vocab_size=V, **kw)) for fam, kw in FAMILIES.items()}
    inp = _inputs()
    results: dict = {}
    for r in run_ranks(_spawned, 4, dirs, str(base / "out"), inp):
        results.update(r)
    return dict(results=results, dirs=dirs, out=base / "out", inp=inp)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> None:
    err = (a - b).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol}"


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_logits_match_transformers_at_every_layout(run, fam):
    ref = _hf_logits(Path(run["dirs"][fam]), run["inp"]["ids"])
    for tp, pp in LAYOUTS:
        got = run["results"][(fam, tp, pp)]
        assert got["padded"] == (V if tp == 1 else 1002)
        assert got["layers"] == ([3] if (tp, pp) == (1, 2) else [2, 3] if pp == 2 else [0, 1, 2, 3])
        assert got["shared"] == (["head.weight"] if fam == "qwen2" and pp == 2 else [])  # tied copy on last stage
        assert got["pad_ok"], f"{fam} tp={tp} pp={pp}: padded logits are not finfo.min"
        _close(got["logits"], ref, f"{fam} tp={tp} pp={pp}")


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_packed_sequences_match_separate_samples(run, fam):
    start = 0
    for n, sample in zip(PACK_LENS, run["inp"]["pack"]):
        ref = _hf_logits(Path(run["dirs"][fam]), sample[None])[0]
        for tp, pp in LAYOUTS:
            _close(run["results"][(fam, tp, pp)]["packed"][start:start + n], ref, f"{fam} packed tp={tp} pp={pp}")
        start += n


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_kv_cache_with_left_padding_matches_full_forward(run, fam):
    for b, seq in enumerate(run["inp"]["seqs"]):
        ref = _hf_logits(Path(run["dirs"][fam]), seq[None])[0]
        for tp, pp in LAYOUTS:
            _close(run["results"][(fam, tp, pp)]["kv"][b], ref, f"{fam} kv sample {b} tp={tp} pp={pp}")


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_gradients_match_transformers_tp2_with_recompute(run, fam):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run["dirs"][fam], dtype=torch.float32)
    ids, w = run["inp"]["ids"], run["inp"]["loss_w"]
    (model(ids).logits * w).sum().backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    got = run["results"][(fam, "grads")]
    assert sorted(got) == sorted(ref)
    for name in ref:
        scale = max(1.0, ref[name].abs().max().item())
        _close(got[name] / scale, ref[name] / scale, f"{fam} grad {name}", tol=2e-5)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_save_hf_roundtrip_is_bit_exact_and_loads_in_transformers(run, fam):
    src, out = Path(run["dirs"][fam]), run["out"] / fam
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg_src, cfg_out = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert cfg_out == cfg_src
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(out.parent.glob(".*tmp*")), "temporary directory left behind"
    ref = _hf_logits(src, run["inp"]["ids"])
    _close(_hf_logits(out, run["inp"]["ids"]), ref, f"{fam} transformers on save_hf output", tol=0.0)
    sharded = run["out"] / f"{fam}_sharded"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(a)
    assert all(torch.equal(_tensors(sharded)[k], a[k]) for k in a)
    _close(run["results"][(fam, "reloaded")], ref, f"{fam} load_hf of a sharded save")


@pytest.mark.slow
def test_build_policy_is_layout_independent(run):
    base = run["results"][("qwen2", 1, 1)]["random"]
    assert base.std() > 0
    for tp, pp in LAYOUTS[1:]:
        _close(run["results"][("qwen2", tp, pp)]["random"], base, f"build_policy tp={tp} pp={pp}")
