"""Qwen3, Mistral and TP wider than the KV heads vs HuggingFace `transformers`, on both decoders.

Tiny random checkpoints are built here with `transformers` (nothing downloaded): Qwen3 (q/k RMSNorm, no QKV bias,
tied embeddings), Mistral (untied, sliding_window=16, longer than every sequence here, so the window changes
nothing and HF's sliding mask is the full causal one), and a Qwen2-shaped model (QKV bias) with 2 KV heads
for TP=4. Qwen3-MoE (4 experts, top-2, with and without
norm_topk_prob) and Mixtral (4 experts, top-2) run on megatron-core's MoE layers (sequential experts, allgather
dispatcher) and on the own decoder's routed experts. Vocab 1001, so TP pads the vocabulary. One 4-rank gloo spawn (tests/dist.py) runs:
- megatron-core GPTPolicy (`engine="mcore"`, sequence parallel on at TP > 1) at TP=1, TP=2, PP=2, TP=2 x PP=2
  for Qwen3 / Mistral / Qwen3-MoE / Mixtral, and at TP=4 for Qwen2 and Qwen3 with 2 KV heads: logits vs HF
  (<= 1e-5, fp32);
- at TP=4: gradients of sum(logits * w) gathered over TP vs HF autograd of the same loss (what TP=1 gives;
  norm gradients summed over TP as megatron-core's finalize_model_grads does), and `save_hf`;
- `save_hf` after `load_hf` at TP=2 x PP=2 (and TP=4): every tensor bit for bit the source's, and
  `transformers` loads the export to the same logits;
- megaent's own decoder (`engine="own"`) at TP=2 (TP=1 too for the MoE families, TP=4 for the 2-KV-head
  models): logits vs HF, and the embedded engine's greedy generation vs HF `generate(do_sample=False)` on
  each prompt (MoE: the own decoder's routed experts, `megaent.model.sparse_moe`), and its ConfigError for an
  expert-parallel state (EP = 2; it holds every expert);
- MoE router statistics (`megaent.model.moe`) at TP=1 and TP=2 (tokens split by sequence parallelism): HF's
  load-balancing aux loss, with and without padding, and the router-logits entropy;
- Mistral sequences longer than the window: both decoders refuse with a ConfigError naming sliding_window.
In this process: published config.json spellings (older `rope_theta` / `torch_dtype`, transformers-5
`rope_parameters` / `dtype`) give the same `ModelArch`.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_model_families.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from hf_tiny import make_tiny_tokenizer

V = 1001
H = 64
WINDOW = 16
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = {  # name -> (transformers family, options)
    "qwen3": ("qwen3", dict(tie=True)),
    "mistral": ("mistral", dict(sliding_window=WINDOW)),
    "qwen2_kv2": ("qwen2", dict(tie=True)),
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=False)),  # softmax over all experts, no renormalisation
    "qwen3_moe_norm": ("qwen3_moe", dict(norm_topk_prob=True, tie=True)),
    "mixtral": ("mixtral", dict()),
}
MOE_FAMILIES = ["qwen3_moe", "qwen3_moe_norm", "mixtral"]
LAYOUT_FAMILIES = ["qwen3", "mistral", *MOE_FAMILIES]
TP4_FAMILIES = ["qwen2_kv2", "qwen3"]
PROMPTS = [[5, 9, 200, 7], [300, 4]]
N_NEW = 6
TOL = 1e-5


def make_family_hf(out: Path, family: str, *, tie: bool = False, seed: int = 0, **extra) -> Path:
    """A tiny random `family` checkpoint (2 layers, 4 heads, 2 KV heads, head_dim 16) with a tokenizer; the MoE
    families get 4 experts of intermediate size 32, top-2."""
    from transformers import (AutoModelForCausalLM, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config,
                              Qwen3MoeConfig)

    cls = {"qwen3": Qwen3Config, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3_moe": Qwen3MoeConfig,
           "mixtral": MixtralConfig}[family]
    if family == "qwen3_moe":
        extra = dict(num_experts=4, moe_intermediate_size=32, num_experts_per_tok=2, **extra)
    if family == "mixtral":
        extra = dict(num_local_experts=4, num_experts_per_tok=2, **extra)
    cfg = cls(vocab_size=V, hidden_size=H, intermediate_size=32 if family == "mixtral" else 2 * H,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
              tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2, bos_token_id=None, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight redrawn: norms near 1 (q/k norms included), biases nonzero
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    model.save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 8), generator=g)
    ids[0, 3] = V - 1  # the last real token lives in the last TP shard, next to the padding
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, -3:] = False  # right padding: the real tokens' router logits do not change
    return {"ids": ids, "loss_w": torch.randn(2, 8, V, generator=g), "mask": mask}


# ---------------------------------------------------------------------------------------------- spawned side
def _gather_vocab(x: torch.Tensor, st) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(st.tp)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


def _mcore_logits(pol, st, ids: torch.Tensor):
    """Forward through all stages (send/recv); full-vocab logits on the last stage, None elsewhere."""
    import torch.distributed as dist

    b, s = ids.shape
    x = None
    if not st.is_first_stage:
        x = torch.empty(s // (st.tp if pol.config.sequence_parallel else 1), b, H, dtype=pol.dtype)
        dist.recv(x, src=st.prev_stage_rank())
    out = pol(ids if st.is_first_stage else None, hidden_states=x)
    if not st.is_last_stage:
        dist.send(out.contiguous(), dst=st.next_stage_rank())
        return None
    return _gather_vocab(out, st)[..., :V]


def _mcore_grads(pol, st, inp: dict) -> dict[str, torch.Tensor]:
    """HF-named full gradients of sum(logits * w) (PP = 1), gathered over TP."""
    import torch.distributed as dist

    from megaent.model import megaent_to_hf

    w = torch.zeros(*inp["ids"].shape, pol.padded_vocab_size)
    w[..., :V] = inp["loss_w"]
    lo, hi = pol.vocab_range
    (pol(inp["ids"]) * w[..., lo:hi]).sum().backward()
    for name, prm in pol.named_parameters():  # megatron-core's finalize_model_grads: one sum over TP
        if getattr(prm, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name:
            dist.all_reduce(prm.grad, group=st.tp_group)
    named = dict(pol.named_parameters())
    per_rank: list[dict] = [{} for _ in range(st.tp)]
    for spec in pol.param_specs():
        grad = pol._from_mcore(spec.name, named[pol.mcore_name(spec.name)].grad)  # collective at tp > KV
        parts = [torch.empty_like(grad) for _ in range(st.tp)]
        dist.all_gather(parts, grad.contiguous(), group=st.tp_group)
        for r in range(st.tp):
            per_rank[r][spec.name] = parts[r]
    return megaent_to_hf(per_rank, pol.arch)


def _own_checks(hf_dir: str, st, inp: dict) -> dict:
    """megaent's own decoder at this TP (PP = 1): full-vocab logits and the embedded engine's greedy tokens."""
    from megaent.model import load_hf
    from megaent.rollout.embedded import EmbeddedEngine
    from megaent.rollout.types import SamplingParams

    own = load_hf(hf_dir, st)
    with torch.no_grad():
        logits = _gather_vocab(own(inp["ids"]), st)[..., :V]
    engine = EmbeddedEngine(own, st)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True))
    return {"logits": logits, "greedy": [s[0].output_ids for s in out]}


def _window_refusals(hf_dir: str, st) -> dict:
    """Both decoders on a sequence of WINDOW + 1 tokens: the errors they raise (type name, message)."""
    from megaent.model import load_hf
    from megaent.rollout.embedded import EmbeddedEngine
    from megaent.rollout.types import SamplingParams

    ids = torch.arange(WINDOW + 1)[None] + 4
    errors = {}
    for eng in ("mcore", "own"):
        pol = load_hf(hf_dir, st, engine=eng)
        try:
            with torch.no_grad():
                pol(ids)
        except Exception as e:  # noqa: BLE001 (the test inspects it)
            errors[eng] = (type(e).__name__, str(e))
    try:
        EmbeddedEngine(pol, st).generate([[5, 6, 7]], SamplingParams(max_new_tokens=WINDOW, temperature=0.0,
                                                                     ignore_eos=True))
    except Exception as e:  # noqa: BLE001
        errors["embedded"] = (type(e).__name__, str(e))
    return errors


def _own_refusal(hf_dir: str, st) -> tuple[str, str]:
    """The error (type name, message) megaent's own decoder raises for this state, or ("", "")."""
    from megaent.model import load_hf

    try:
        load_hf(hf_dir, st)
    except Exception as e:  # noqa: BLE001 (the test inspects it)
        return type(e).__name__, str(e)
    return "", ""


def _router_stats(pol, st, inp: dict, fam: str) -> dict:
    """HF's load-balancing loss and the router entropy from the captured router logits (PP = 1), with the
    tokens of sequence parallelism split over tp_group; recorded on global rank 0."""
    import torch.distributed as dist

    from megaent.model.moe import capture_router_logits, load_balancing_loss, router_entropy

    with torch.no_grad(), capture_router_logits(pol) as logits:
        pol(inp["ids"])
    b, s = inp["ids"].shape
    rows = slice(st.tp_rank * s // st.tp, (st.tp_rank + 1) * s // st.tp) if pol.config.sequence_parallel \
        else slice(0, s)
    mask = inp["mask"].T[rows].reshape(-1)  # megatron-core's token order: t = s * B + b
    group = st.tp_group if pol.config.sequence_parallel else None
    a = pol.arch
    out = dict(aux=load_balancing_loss(logits, num_experts=a.num_experts, top_k=a.experts_per_token, group=group),
               aux_masked=load_balancing_loss(logits, num_experts=a.num_experts, top_k=a.experts_per_token,
                                              token_mask=mask, group=group),
               entropy=router_entropy(logits, group=group), layers=len(logits))
    return {(fam, "router", st.tp): out} if dist.get_rank() == 0 else {}


def _ep_ids(ids: torch.Tensor, dp_rank: int) -> torch.Tensor:
    """Different tokens on each DP rank, so experts on the other EP rank see other ranks' tokens."""
    return (ids + 37 * dp_rank) % V


def _ep_checks(pol, st, inp: dict) -> dict:
    """At EP = 2 (PP = 1): this DP rank's full-vocab logits of its own ids, and log p / entropy of the next tokens
    through the fused head (the training path) on the final hidden states."""
    from megaent.ops.fused_head import fused_head_logprobs_entropy

    ids = _ep_ids(inp["ids"], st.dp_rank)
    with torch.no_grad():
        logits = _gather_vocab(pol(ids), st)[..., :V]
        h = pol.final_hidden(ids)
        logp, ent = fused_head_logprobs_entropy(h[:, :-1], pol.head_weight, ids[:, 1:], st.tp_group,
                                                vocab_size=V, entropy_grad=False)
    return dict(ids=ids, logits=logits, logp=logp, entropy=ent)


EP_LAYOUTS = [(1, 2), (2, 2)]  # (tp, ep) at PP = 1 in the 4-rank world


def _spawned(rank: int, world: int, dirs: dict[str, str], out_dir: str, inp: dict) -> dict:
    from megaent.model import load_hf, save_hf
    from megaent.parallel import init_parallel

    res: dict = {}
    for fam in LAYOUT_FAMILIES:
        for tp, pp in LAYOUTS:
            st = init_parallel(tp, pp)
            pol = load_hf(dirs[fam], st, engine="mcore")
            if fam in MOE_FAMILIES and pp == 1:
                res.update(_router_stats(pol, st, inp, fam))
            logits = _mcore_logits(pol, st, inp["ids"])
            if st.is_last_stage and st.tp_rank == 0 and st.dp_rank == 0:
                res[(fam, "mcore", tp, pp)] = dict(logits=logits, sp=pol.config.sequence_parallel)
            if (tp, pp) == (2, 2):
                save_hf(pol, st, f"{out_dir}/{fam}")
        if fam in MOE_FAMILIES:
            for tp, ep in EP_LAYOUTS:
                st = init_parallel(tp, 1, ep)
                pol = load_hf(dirs[fam], st, engine="mcore")
                assert len(pol.model.decoder.layers[0].mlp.experts.local_experts) == pol.arch.num_experts // ep
                got = _ep_checks(pol, st, inp)
                if st.tp_rank == 0:
                    res[(fam, "ep", tp, ep, st.dp_rank)] = got
                if tp == 1:
                    save_hf(pol, st, f"{out_dir}/{fam}_ep2")
                    res[(fam, "own at ep2")] = _own_refusal(dirs[fam], st)
        for tp in (1, 2) if fam in MOE_FAMILIES else (2,):
            st = init_parallel(tp, 1)
            own = _own_checks(dirs[fam], st, inp)
            if rank == 0:
                res[(fam, "own", tp)] = own
    for fam in TP4_FAMILIES:
        st = init_parallel(4, 1)
        pol = load_hf(dirs[fam], st, engine="mcore")
        logits = _mcore_logits(pol, st, inp["ids"])
        grads = _mcore_grads(pol, st, inp)
        save_hf(pol, st, f"{out_dir}/{fam}_tp4")
        own = _own_checks(dirs[fam], st, inp)
        if rank == 0:
            res[(fam, "mcore", 4, 1)] = dict(logits=logits, sp=pol.config.sequence_parallel, grads=grads)
            res[(fam, "own", 4)] = own
    st = init_parallel(1, 1)
    refusals = _window_refusals(dirs["mistral"], st)
    if rank == 0:
        res["refusals"] = refusals
    return res


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {name: str(make_family_hf(root / name, fam, **kw)) for name, (fam, kw) in FAMILIES.items()}
    inp = _inputs()
    res: dict = {}
    for r in run_ranks(_spawned, 4, dirs, str(root / "out"), inp):
        res.update(r)
    return res, dirs, root, inp


def _hf(hf_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _ref_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _hf(hf_dir)(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("fam,tp,pp", [(f, tp, pp) for f in LAYOUT_FAMILIES for tp, pp in LAYOUTS]
                         + [(f, 4, 1) for f in TP4_FAMILIES])
def test_gpt_policy_logits_match_hf(results, fam, tp, pp):
    res, dirs, _, inp = results
    r = res[(fam, "mcore", tp, pp)]
    assert r["sp"] == (tp > 1)
    assert (r["logits"] - _ref_logits(dirs[fam], inp["ids"])).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("fam", MOE_FAMILIES)
@pytest.mark.parametrize("tp,ep", EP_LAYOUTS)
def test_expert_parallel_logits_and_entropies_match_hf(results, fam, tp, ep):
    """Each DP rank feeds its own tokens; logits vs HF <= 1e-5, and the fused head's token log-probs / entropies
    equal those of HF's logits (what EP = 1 computes) whichever EP rank ran each token's experts."""
    res, dirs, _, inp = results
    dp = 4 // tp
    for d in range(dp):
        got = res[(fam, "ep", tp, ep, d)]
        ref = _ref_logits(dirs[fam], _ep_ids(inp["ids"], d))
        assert torch.equal(got["ids"], _ep_ids(inp["ids"], d))
        assert (got["logits"] - ref).abs().max().item() <= TOL, (fam, tp, ep, d)
        lsm = torch.log_softmax(ref[:, :-1].double(), -1)
        ent = -(lsm.exp() * lsm).sum(-1)
        logp = lsm.gather(-1, got["ids"][:, 1:, None])[..., 0]
        assert (got["entropy"].double() - ent).abs().max().item() <= TOL
        assert (got["logp"].double() - logp).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("fam", TP4_FAMILIES)
def test_tp4_with_two_kv_heads_gradients_match_hf(results, fam):
    """TP=4 > 2 KV heads: each KV head's rows live on two ranks; the gathered gradients equal HF's (TP=1)."""
    res, dirs, _, inp = results
    model = _hf(dirs[fam])
    (model(inp["ids"]).logits * inp["loss_w"]).sum().backward()
    got = res[(fam, "mcore", 4, 1)]["grads"]
    for name, p in model.named_parameters():
        key = name if name in got else "model.embed_tokens.weight"  # tied: HF's lm_head is the embedding
        scale = p.grad.abs().max().clamp(min=1.0)
        assert (got[key] - p.grad).abs().max() <= 1e-4 * scale, name


@pytest.mark.slow
@pytest.mark.parametrize("fam,sub", [(f, f) for f in LAYOUT_FAMILIES] + [(f, f"{f}_tp4") for f in TP4_FAMILIES]
                         + [(f, f"{f}_ep2") for f in MOE_FAMILIES])
def test_save_hf_after_load_hf_is_bit_exact_and_loads(results, fam, sub):
    from safetensors.torch import load_file

    _, dirs, root, inp = results
    src = load_file(str(Path(dirs[fam]) / "model.safetensors"))
    out = load_file(str(root / "out" / sub / "model.safetensors"))
    assert set(out) == set(src)
    for k in src:
        assert torch.equal(out[k], src[k]), k
    assert torch.equal(_ref_logits(str(root / "out" / sub), inp["ids"]), _ref_logits(dirs[fam], inp["ids"]))


@pytest.mark.slow
@pytest.mark.parametrize("fam,tp", [(f, 2) for f in LAYOUT_FAMILIES] + [(f, 1) for f in MOE_FAMILIES]
                         + [(f, 4) for f in TP4_FAMILIES])
def test_own_decoder_logits_and_greedy_generation_match_hf(results, fam, tp):
    """megaent's own decoder (MoE: `megaent.model.sparse_moe`, every expert TP-split) vs HF: logits <= 1e-5 and
    the embedded engine's greedy tokens equal to HF `generate(do_sample=False)`."""
    res, dirs, _, inp = results
    r = res[(fam, "own", tp)]
    model = _hf(dirs[fam])
    with torch.no_grad():
        assert (r["logits"] - model(inp["ids"]).logits).abs().max() <= TOL
    for prompt, got in zip(PROMPTS, r["greedy"]):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref


@pytest.mark.slow
@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_own_decoder_refuses_expert_parallel_states_naming_the_way_out(results, fam):
    """The trainer's EP ranks hold only their experts; the own decoder (every expert) refuses to follow them."""
    kind, msg = results[0][(fam, "own at ep2")]
    assert kind == "ConfigError"
    assert "parallel.ep=2" in msg and "rollout.engine=http" in msg and "parallel.ep=1" in msg


@pytest.mark.slow
@pytest.mark.parametrize("fam", MOE_FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_load_balancing_loss_and_router_entropy_match_hf(results, fam, tp):
    """HF's aux_loss (output_router_logits, before router_aux_loss_coef), with and without padding, and the
    entropy of its router logits; at TP=2 sequence parallelism splits the tokens over the ranks."""
    res, dirs, _, inp = results
    r = res[(fam, "router", tp)]
    model = _hf(dirs[fam])
    with torch.no_grad():
        full = model(inp["ids"], output_router_logits=True)
        masked = model(inp["ids"], attention_mask=inp["mask"].long(), output_router_logits=True)
    logits = torch.cat(full.router_logits).float()
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    assert r["layers"] == len(full.router_logits)
    assert abs(float(r["aux"]) - float(full.aux_loss)) <= 1e-6
    assert abs(float(r["aux_masked"]) - float(masked.aux_loss)) <= 1e-6
    assert abs(float(r["aux_masked"]) - float(r["aux"])) > 1e-6  # the mask matters
    assert abs(float(r["entropy"]) - float(ent)) <= 1e-6


@pytest.mark.slow
def test_sequences_longer_than_the_sliding_window_are_refused(results):
    refusals = results[0]["refusals"]
    assert set(refusals) == {"mcore", "own", "embedded"}
    for kind, msg in refusals.values():
        assert kind == "ConfigError"
        assert f"sliding_window={WINDOW}" in msg and "prompt + response" in msg


# ---------------------------------------------------------------------------------------------- config spellings
QWEN3_0_6B = {  # the published Qwen3-0.6B config.json (transformers 4.51 spelling)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
MISTRAL_7B_V01 = {  # the published Mistral-7B-v0.1 config.json (sliding window 4096)
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
MISTRAL_SMALL_24B = {  # the published Mistral-Small-24B-Instruct-2501 config.json (no window, explicit head_dim)
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 32768, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 100000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.49.0.dev0", "use_cache": True, "vocab_size": 131072}

QWEN3_30B_A3B = {  # the published Qwen3-30B-A3B config.json (MoE: 128 experts, top-8, renormalised)
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
MIXTRAL_8X7B = {  # the published Mixtral-8x7B-v0.1 config.json
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000}


def _transformers5_spelling(cfg: dict) -> dict:
    """The same config written by the installed transformers (rope_parameters, dtype)."""
    from transformers import AutoConfig

    new = json.loads(AutoConfig.for_model(**cfg).to_json_string())
    assert "rope_parameters" in new and "rope_theta" not in new and "torch_dtype" not in new
    return new


@pytest.mark.parametrize("cfg,want", [
    (QWEN3_0_6B, dict(qk_norm=True, qkv_bias=False, sliding_window=None, head_dim=128, rope_theta=1e6,
                      tie_word_embeddings=True)),
    (MISTRAL_7B_V01, dict(qk_norm=False, qkv_bias=False, sliding_window=4096, head_dim=128, rope_theta=1e4)),
    (MISTRAL_SMALL_24B, dict(qk_norm=False, qkv_bias=False, sliding_window=None, head_dim=128, rope_theta=1e8)),
    (QWEN3_30B_A3B, dict(qk_norm=True, num_experts=128, experts_per_token=8, moe_intermediate_size=768,
                         moe_renormalize=True, router_aux_loss_coef=0.001)),
    (MIXTRAL_8X7B, dict(qk_norm=False, num_experts=8, experts_per_token=2, moe_intermediate_size=14336,
                        moe_renormalize=True, router_aux_loss_coef=0.02, sliding_window=None)),
])
def test_published_config_spellings_load_the_same(cfg, want):
    from megaent.model import ModelArch

    old, new = ModelArch.from_hf_config(cfg), ModelArch.from_hf_config(_transformers5_spelling(cfg))
    assert old == new
    assert old.dtype == "bfloat16"
    for key, val in want.items():
        assert getattr(old, key) == val, key


def test_qwen_sliding_window_counts_only_when_used():
    from megaent.model import ModelArch

    base = {**QWEN3_0_6B, "sliding_window": 4096}
    assert ModelArch.from_hf_config(base).sliding_window is None  # use_sliding_window false: full attention
    assert ModelArch.from_hf_config({**base, "use_sliding_window": True}).sliding_window == 4096


def test_moe_configs_megaent_cannot_build_are_refused():
    from megaent.model import ModelArch

    for patch, key in [({"decoder_sparse_step": 2}, "decoder_sparse_step"), ({"mlp_only_layers": [0]}, "mlp_only"),
                       ({"router_jitter_noise": 0.1}, "router_jitter_noise")]:
        with pytest.raises(ValueError, match=key):
            ModelArch.from_hf_config({**(MIXTRAL_8X7B if "jitter" in key else QWEN3_30B_A3B), **patch})
    with pytest.raises(ValueError, match="num_experts=4"):  # MoE keys on a dense family
        ModelArch.from_hf_config({**QWEN3_0_6B, "num_experts": 4})


def test_tp_wider_than_kv_heads_layout_checks():
    from megaent.model import ModelArch

    arch = ModelArch.from_hf_config({**QWEN3_0_6B, "num_key_value_heads": 2})
    arch.check_layout(tp=8, pp=1)  # 16 heads, 2 KV heads of 128: each KV head over 4 ranks
    assert arch.local_kv_heads(8) == 1 and arch.local_kv_heads(2) == 1 and arch.local_kv_heads(1) == 2
    with pytest.raises(ValueError, match=r"parallel.tp=3 does not divide num_key_value_heads=2"):
        ModelArch.from_hf_config({**QWEN3_0_6B, "num_attention_heads": 12, "num_key_value_heads": 2}
                                 ).check_layout(tp=3, pp=1)


def test_window_error_names_the_key_and_the_fix():
    from megaent.config.errors import ConfigError
    from megaent.model import ModelArch

    arch = ModelArch.from_hf_config(MISTRAL_7B_V01)
    arch.check_sequence_length(4096)
    with pytest.raises(ConfigError, match=r"sliding_window=4096: a sequence of 4097 tokens"):
        arch.check_sequence_length(4097)


@pytest.mark.parametrize("base", ["qwen3", "qwen3_moe", "mixtral"])
def test_trainer_layout_check_agrees_with_the_models_rule(tmp_path, base):
    """`megaent train`'s pre-launch check (megaent.trainer.run.check_layout, which must not import the model
    code) accepts exactly the tp the model itself accepts (ModelArch.check_layout), TP wider than the KV heads
    included; it refused TP > KV heads before."""
    from megaent.config import load_config
    from megaent.config.errors import ConfigError
    from megaent.model import ModelArch
    from megaent.trainer.run import check_layout

    cfg0 = {"qwen3": QWEN3_0_6B, "qwen3_moe": QWEN3_30B_A3B, "mixtral": MIXTRAL_8X7B}[base]
    seen = set()
    for heads, kv in [(16, 2), (16, 8), (12, 2), (32, 4)]:
        c = {**cfg0, "num_attention_heads": heads, "num_key_value_heads": kv}
        (tmp_path / "config.json").write_text(json.dumps(c))
        arch = ModelArch.from_hf_config(c)
        for tp in (1, 2, 3, 4, 8, 16):
            try:
                arch.check_layout(tp=tp, pp=1)
                model_ok = True
            except ValueError:
                model_ok = False
            cfg = load_config(None, [f"model.path={tmp_path}", f"parallel.tp={tp}", "rollout.engine=http",
                                     "rollout.urls=[http://127.0.0.1:1]"])
            try:
                check_layout(cfg, world=tp)
                trainer_ok = True
            except ConfigError:
                trainer_ok = False
            assert trainer_ok == model_ok, (base, heads, kv, tp, model_ok)
            seen.add((model_ok, tp > kv))
    assert (True, True) in seen and (False, False) in seen  # the grid has accepted tp > kv and refused cases


def test_moe_aux_loss_at_pp2_is_refused_not_dropped(tmp_path):
    """HF trains with the load-balancing loss when output_router_logits is true; megaent adds it at PP = 1 only,
    so a PP = 2 run of such a checkpoint is a ConfigError naming both ways out, not a silently different loss."""
    from megaent.config import load_config
    from megaent.config.errors import ConfigError
    from megaent.trainer.run import check_layout

    for on, coef in [(True, 0.001), (False, 0.001), (True, 0.0)]:
        (tmp_path / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "output_router_logits": on,
                                                          "router_aux_loss_coef": coef}))
        for pp in (1, 2):
            cfg = load_config(None, [f"model.path={tmp_path}", f"parallel.pp={pp}", "rollout.engine=http",
                                     "rollout.urls=[http://127.0.0.1:1]"])
            if pp == 2 and on and coef > 0:
                with pytest.raises(ConfigError, match="output_router_logits.*parallel.pp=1"):
                    check_layout(cfg, world=2)
            else:
                check_layout(cfg, world=pp)
