"""ModelArch parsing, layout checks, RoPE frequencies and the HF name table (single process, no spawn).

References: `transformers` itself (its config classes write the transformers-5
spelling; its `ROPE_INIT_FUNCTIONS` give the inverse frequencies), the older
config.json spelling rewritten by hand here, and bit-exact round trips of the
pure TP split/merge helpers against the original tensors.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_model_arch.py -q
"""
from __future__ import annotations

import json

import pytest
import torch

from megaent.model import ModelArch, hf_to_megaent, megaent_to_hf, merge_tp, padded_vocab_size, split_tp
from megaent.model.arch import stage_layer_ranges
from megaent.model.rope import inv_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _hf_config(family: str, **kw) -> dict:
    from transformers import LlamaConfig, Qwen2Config

    base = dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, dtype="bfloat16")
    base.update(kw)
    cls = Qwen2Config if family == "qwen2" else LlamaConfig
    return json.loads(cls(**base).to_json_string())


def _old_spelling(cfg: dict) -> dict:
    """The pre-transformers-5 config.json: top-level rope_theta/rope_scaling, torch_dtype."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rtype = rope.pop("rope_type")
    if rtype != "default":
        # Old Llama-2 era files spelled it "type"; Llama 3.1 files use "rope_type".
        cfg["rope_scaling"] = {("type" if rtype == "linear" else "rope_type"): rtype, **rope}
    else:
        cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


@pytest.mark.parametrize("family,kw", [
    ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    ("llama", dict(rope_parameters={"rope_theta": 5e5, **LLAMA3})),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, attention_bias=True)),
])
def test_both_config_spellings_give_the_same_arch(family, kw):
    new = _hf_config(family, **kw)
    assert "rope_parameters" in new and "dtype" in new and "rope_theta" not in new  # transformers-5 spelling
    a_new, a_old = ModelArch.from_hf_config(new), ModelArch.from_hf_config(_old_spelling(new))
    assert a_new == a_old
    assert a_new.dtype == "bfloat16"
    rope = new["rope_parameters"]
    assert a_new.rope_theta == rope["rope_theta"] and a_new.rope_type == rope["rope_type"]
    assert a_new.qkv_bias == (family == "qwen2" or new.get("attention_bias", False))
    assert a_new.tie_word_embeddings == new["tie_word_embeddings"]
    assert a_new.head_dim == 16 and a_new.num_key_value_heads == 2


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rope_inverse_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 5e5, **rope})
    arch = ModelArch.from_hf_config(json.loads(cfg.to_json_string()))
    if rope["rope_type"] == "default":
        ref = 1.0 / (5e5 ** (torch.arange(0, 16, 2).float() / 16))
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        assert scale == 1.0  # megaent applies no attention scaling for these types
    torch.testing.assert_close(inv_frequencies(arch), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("patch,key", [
    ({"model_type": "gemma"}, "model_type"),
    ({"layer_types": ["chunked_attention"] * 4}, "layer_types"),
    ({"num_experts": 8}, "num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='dynamic'"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_unsupported_configs_raise_naming_the_key(patch, key):
    cfg = _hf_config("qwen2")
    cfg.update(patch)
    with pytest.raises(ValueError, match="config.json") as err:
        ModelArch.from_hf_config(cfg)
    assert key in str(err.value)


def test_layout_checks_name_parallel_tp_and_pp():
    arch = ModelArch.from_hf_config(_hf_config("qwen2", num_attention_heads=6, num_key_value_heads=2,
                                               hidden_size=96))
    arch.check_layout(tp=2, pp=2)
    with pytest.raises(ValueError, match=r"parallel.tp=4 does not divide num_attention_heads=6"):
        arch.check_layout(tp=4, pp=1)
    with pytest.raises(ValueError, match=r"parallel.tp=3 does not divide num_key_value_heads=2"):
        arch.check_layout(tp=3, pp=1)
    with pytest.raises(ValueError, match=r"parallel.pp=5 exceeds num_hidden_layers=4"):
        arch.check_layout(tp=1, pp=5)
    with pytest.raises(ValueError, match=r"model.pipeline_layers=\[1, 2\]"):
        arch.check_layout(tp=1, pp=2, pipeline_layers=[1, 2])


def test_stage_layer_ranges():
    assert stage_layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert stage_layer_ranges(4, 2, [3, 1]) == [range(0, 3), range(3, 4)]
    assert stage_layer_ranges(4, 3, [2, 2, 0]) == [range(0, 2), range(2, 4), range(4, 4)]


def test_to_hf_config_keeps_original_fields_and_roundtrips():
    cfg = _old_spelling(_hf_config("llama", rope_parameters={"rope_theta": 5e5, **LLAMA3}))
    cfg["custom_field"] = 7
    arch = ModelArch.from_hf_config(cfg)
    out = arch.to_hf_config(dtype="float32")
    assert out["custom_field"] == 7 and out["torch_dtype"] == "float32"
    assert ModelArch.from_hf_config(out) == ModelArch.from_hf_config({**cfg, "torch_dtype": "float32"})
    fresh = ModelArch(**{**arch.__dict__, "hf_config": {}})  # built without a source config.json
    assert ModelArch.from_hf_config(fresh.to_hf_config()) == fresh


def _random_hf_state(arch: ModelArch, seed: int = 0) -> dict[str, torch.Tensor]:
    from megaent.model.hf_names import model_param_specs

    g = torch.Generator().manual_seed(seed)
    specs = [s for stage in model_param_specs(arch) for s in stage]
    out = {p.hf_name: torch.randn(p.shape, generator=g) for s in specs for p in s.parts}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = torch.randn(arch.vocab_size, arch.hidden_size, generator=g)
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hf_megaent_state_roundtrip_is_bit_exact(family, tp, pp):
    tie = family == "qwen2"
    arch = ModelArch.from_hf_config(_hf_config(family, tie_word_embeddings=tie, num_attention_heads=8,
                                               num_key_value_heads=4))
    hf = _random_hf_state(arch)
    shards = [[hf_to_megaent(hf, arch, tp_rank=r, tp=tp, pp_rank=s, pp=pp) for r in range(tp)] for s in range(pp)]
    per_tp = [{k: v for s in range(pp) for k, v in shards[s][r].items()} for r in range(tp)]
    back = megaent_to_hf(per_tp, arch)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # Independent check of the fused QKV layout: rank r holds q heads [r*Nl, (r+1)*Nl), then its k, v heads.
    r, nl, kvl, d = tp - 1, 8 // tp, 4 // tp, 8
    qkv = shards[0][r]["layers.0.attn.qkv.weight"]
    q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(qkv[: nl * d], q[r * nl * d:(r + 1) * nl * d])
    assert torch.equal(qkv[nl * d: nl * d + kvl * d], k[r * kvl * d:(r + 1) * kvl * d])
    emb = shards[0][r]["embed.weight"]
    vp = padded_vocab_size(1001, tp)
    assert emb.shape[0] == vp // tp and (tp == 1 or bool((emb[1001 - r * vp // tp:] == 0).all()))


def test_split_merge_tp_kinds():
    t = torch.randn(10, 6)
    for kind in ("column", "row", "replicated"):
        assert torch.equal(merge_tp([split_tp(t, kind, r, 2) for r in range(2)], kind), t)
    shards = [split_tp(t, "vocab", r, 4, padded_rows=12) for r in range(4)]
    assert [s.shape[0] for s in shards] == [3, 3, 3, 3] and bool((shards[3][1:] == 0).all())
    assert torch.equal(merge_tp(shards, "vocab", rows=10), t)
    with pytest.raises(ValueError, match="not divisible by parallel.tp=4"):
        split_tp(t, "row", 0, 4)
