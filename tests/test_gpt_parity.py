"""megatron-core GPTModel policy (`engine="mcore"`) vs HuggingFace `transformers`, at TP x PP layouts.

One 4-rank gloo spawn (tests/dist.py) loads tiny random Qwen2 (GQA, QKV bias, tied embeddings) and Llama 3
(untied, llama3 RoPE scaling) checkpoints from tests/hf_tiny.py, vocab 1001 so TP=2 pads the vocabulary, at
TP=1, TP=2 (sequence parallel on, megaent's default with TP > 1), PP=2 (uneven split 3+1) and TP=2 x PP=2.
Stages pass hidden states with send/recv; logits are gathered over TP.

References (computed here with `transformers`, float32):
- logits of the full model (<= 1e-5 max abs), padded vocabulary entries at finfo.min;
- a packed THD micro-batch (PackedSeqParams, cu_seqlens) vs each sample run alone through HF;
- final hidden states times the head shard (the fused-head input) equal the logits;
- gradients of sum(logits * w) at TP=2 with sequence parallel vs HF autograd;
- `save_hf` after `load_hf` at TP=2 x PP=2: every tensor bit for bit equal to the source checkpoint.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_gpt_parity.py -q
"""
from __future__ import annotations

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
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  max_position_embeddings=16384),
}
PACK_LENS = [4, 6, 3]
TOL = 1e-5


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 8), generator=g)
    ids[0, 3] = V - 1  # the last real token lives in the last TP shard, next to the padding
    pack = [torch.randint(0, V, (n,), generator=g) for n in PACK_LENS]
    return {"ids": ids, "pack": pack, "loss_w": torch.randn(2, 8, V, generator=g)}


def _gather_vocab(x: torch.Tensor, st) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(st.tp)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


def _stage_forward(policy, st, ids: torch.Tensor, *, hidden_shape, fn=None, **kw):
    """Forward through all stages (send/recv over the pipeline); this TP rank's last-stage output."""
    import torch.distributed as dist

    x = None
    if not st.is_first_stage:
        x = torch.empty(hidden_shape, dtype=policy.dtype)
        dist.recv(x, src=st.prev_stage_rank())
    out = (fn or policy)(ids if st.is_first_stage else None, hidden_states=x, **kw)
    if not st.is_last_stage:
        dist.send(out.contiguous(), dst=st.next_stage_rank())
        return None
    return out


def _spawned(rank: int, world: int, dirs: dict[str, str], out_dir: str, inp: dict) -> dict:
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams

    from megaent.model import load_hf, save_hf
    from megaent.parallel import init_parallel

    res: dict = {}
    for fam, hf_dir in dirs.items():
        for tp, pp in LAYOUTS:
            st = init_parallel(tp, pp)
            rec = st.is_last_stage and st.tp_rank == 0 and st.dp_rank == 0
            pol = load_hf(hf_dir, st, engine="mcore", pipeline_layers=[3, 1] if (tp, pp) == (1, 2) else None)
            b, s = inp["ids"].shape
            sp = pol.config.sequence_parallel
            full = _stage_forward(pol, st, inp["ids"], hidden_shape=(s // (tp if sp else 1), b, 64))
            packed = torch.cat(inp["pack"])[None]
            cu = torch.tensor([0, *torch.tensor(PACK_LENS).cumsum(0).tolist()], dtype=torch.int32)
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(PACK_LENS),
                                  max_seqlen_kv=max(PACK_LENS))
            t = packed.shape[1]
            pad = (-t) % tp if sp else 0  # sequence parallel splits the tokens over TP: pad the pack
            if pad:
                packed = torch.cat([packed, torch.zeros(1, pad, dtype=torch.long)], dim=1)
                cu = torch.cat([cu, cu[-1:] + pad])
                psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(PACK_LENS),
                                      max_seqlen_kv=max(PACK_LENS))
            pk = _stage_forward(pol, st, packed, packed_seq_params=psp,
                                hidden_shape=((t + pad) // (tp if sp else 1), 1, 64))
            hid = _stage_forward(pol, st, inp["ids"], fn=pol.final_hidden,
                                 hidden_shape=(s // (tp if sp else 1), b, 64))
            if st.is_last_stage:
                via_hidden = pol.mask_padded_vocab(hid @ pol.head_weight.T)
                full, pk, via_hidden = (_gather_vocab(x, st) for x in (full, pk, via_hidden))
            if rec:
                res[(fam, tp, pp)] = dict(logits=full[..., :V], pad_ok=bool((full[..., V:] == torch.finfo(
                    full.dtype).min).all()), packed=pk[0, :t, :V], hidden=via_hidden[..., :V], sp=sp,
                    layers=pol.layer_ids)
            if (tp, pp) == (2, 1):
                w = torch.zeros(b, s, pol.padded_vocab_size)
                w[..., :V] = inp["loss_w"]
                lo, hi = pol.vocab_range
                (pol(inp["ids"]) * w[..., lo:hi]).sum().backward()
                for prm in pol.parameters():  # what megatron-core's finalize_model_grads does under DDP
                    if getattr(prm, "sequence_parallel", False):
                        dist.all_reduce(prm.grad, group=st.tp_group)
                from megaent.model import megaent_to_hf

                grads = {}
                per_rank: list[dict] = [{} for _ in range(tp)]
                named = dict(pol.named_parameters())
                for spec in pol.param_specs():
                    grad = pol._from_mcore(spec.name, named[pol.mcore_name(spec.name)].grad)
                    parts = [torch.empty_like(grad) for _ in range(tp)]
                    dist.all_gather(parts, grad.contiguous(), group=st.tp_group)
                    for r in range(tp):
                        per_rank[r][spec.name] = parts[r]
                grads = megaent_to_hf(per_rank, pol.arch)
                if rank == 0:
                    res[(fam, "grads")] = grads
            if (tp, pp) == (2, 2):
                save_hf(pol, st, f"{out_dir}/{fam}")
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_parity")
    dirs = {fam: str(make_tiny_hf(root / fam, vocab_size=V, hidden=64, layers=4, heads=4, kv_heads=2, **kw))
            for fam, kw in FAMILIES.items()}
    inp = _inputs()
    res: dict = {}
    for r in run_ranks(_spawned, 4, dirs, str(root / "out"), inp):
        res.update(r)
    return res, dirs, root, inp


def _hf(hf_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_hf(results, fam, tp, pp):
    res, dirs, _, inp = results
    r = res[(fam, tp, pp)]
    model = _hf(dirs[fam])
    with torch.no_grad():
        ref = model(inp["ids"]).logits
        ref_pack = torch.cat([model(x[None]).logits[0] for x in inp["pack"]])
    assert r["sp"] == (tp > 1)
    assert r["pad_ok"] or tp == 1
    assert (r["logits"] - ref).abs().max() <= TOL
    assert (r["packed"] - ref_pack).abs().max() <= TOL
    assert (r["hidden"] - ref).abs().max() <= TOL
    if (tp, pp) == (1, 2):
        assert r["layers"] == [3]  # the uneven split 3 + 1 reached the last stage


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_gradients_match_hf_tp2_sequence_parallel(results, fam):
    res, dirs, _, inp = results
    model = _hf(dirs[fam])
    (model(inp["ids"]).logits * inp["loss_w"]).sum().backward()
    got = res[(fam, "grads")]
    for name, p in model.named_parameters():
        key = name if name in got else "model.embed_tokens.weight"  # tied: HF's lm_head is the embedding
        scale = p.grad.abs().max().clamp(min=1.0)
        assert (got[key] - p.grad).abs().max() <= 1e-4 * scale, name


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_save_hf_round_trip_is_bit_exact(results, fam):
    from safetensors.torch import load_file

    _, dirs, root, _ = results
    src = load_file(str(Path(dirs[fam]) / "model.safetensors"))
    out = load_file(str(root / "out" / fam / "model.safetensors"))
    assert set(out) == set(src)
    for k in src:
        assert torch.equal(out[k], src[k]), k
