"""`ModelArch`: the decoder shape megaent builds, read from a HuggingFace `config.json`.

The dense families are one table, `FAMILIES` (model_type -> `Family`): RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP, tied or untied embeddings everywhere; a family differs only in
- QKV bias: always (qwen2), never (mistral) or config.json's `attention_bias` (llama, qwen3);
- per-head RMSNorm on q and k before RoPE (qwen3: `self_attn.q_norm` / `k_norm`);
- where a sliding attention window is read: `sliding_window` itself (mistral, null = none), or
  `sliding_window` only when `use_sliding_window` / `layer_types` ask for it (qwen2, qwen3).

Sliding windows: megaent attends over the full causal context. That equals sliding-window attention of
width W exactly while no sequence is longer than W tokens, so a window is accepted and recorded
(`ModelArch.sliding_window`), and `check_sequence_length` refuses longer sequences with a `ConfigError`
naming the fix (the forwards call it).

Both spellings of `config.json` are read:
- older checkpoints: top-level `rope_theta`, `rope_scaling` (with `type` or `rope_type`), `torch_dtype`;
- transformers 5: a `rope_parameters` dict holding `rope_theta` and `rope_type` plus scaling keys, and `dtype`.

Anything megaent does not implement (MoE, other activations, other RoPE types) raises a `ValueError` that
names the `config.json` key, the value, and what is supported, instead of silently producing a different model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional



@dataclass(frozen=True)
class Family:
    """What one `model_type` changes in the shared decoder."""

    hf_class: str
    """`architectures` entry of an exported config.json."""
    qkv_bias: Optional[bool]
    """Fixed QKV bias, or None: read config.json `attention_bias` (default false)."""
    qk_norm: bool = False
    """Per-head RMSNorm of q and k (weights [D]) before RoPE."""
    window_always: bool = False
    """True: config.json `sliding_window` applies whenever set (Mistral); False: only with
    `use_sliding_window` or `sliding_attention` layer types (Qwen2/Qwen3)."""
    moe: Optional["MoeNames"] = None
    """Mixture-of-experts MLP in every layer: how config.json and the tensors name it; None = dense SwiGLU."""


@dataclass(frozen=True)
class MoeNames:
    """config.json keys and HF tensor names of a family's MoE MLP (router + SwiGLU experts)."""

    experts_keys: tuple[str, ...]
    """config.json keys of the expert count, the first present wins (Qwen3-MoE's published `num_experts` is
    written `num_local_experts` by transformers 5)."""
    size_key: str
    """config.json key of one expert's intermediate size."""
    block: str
    """HF module of the MoE block under `model.layers.{l}.`."""
    gate: str
    up: str
    down: str
    """HF names of one expert's gate, up and down projections."""
    renormalize: Optional[bool]
    """Top-k weights renormalised to sum 1 (Mixtral: always), or None: config.json `norm_topk_prob`."""


FAMILIES: dict[str, Family] = {
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True),
    "llama": Family("LlamaForCausalLM", qkv_bias=None),
    "qwen3": Family("Qwen3ForCausalLM", qkv_bias=None, qk_norm=True),
    "mistral": Family("MistralForCausalLM", qkv_bias=False, window_always=True),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qkv_bias=None, qk_norm=True, moe=MoeNames(
        ("num_experts", "num_local_experts"), "moe_intermediate_size", "mlp", "gate_proj", "up_proj", "down_proj",
        renormalize=None)),
    "mixtral": Family("MixtralForCausalLM", qkv_bias=False, window_always=True, moe=MoeNames(
        ("num_local_experts",), "intermediate_size", "block_sparse_moe", "w1", "w3", "w2", renormalize=True)),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
_ROPE_KEYS = {  # scaling keys kept per rope type (everything else in the dict is dropped)
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelArch:
    """Shape and numerics of a dense decoder of one of `FAMILIES` (what `config.json` says, normalised)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    """One of SUPPORTED_ROPE_TYPES."""
    rope_scaling: dict[str, float] = field(default_factory=dict)
    """Scaling keys of `rope_type` only (factor, low/high_freq_factor, original_max_position_embeddings)."""
    qkv_bias: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    sliding_window: Optional[int] = None
    """Attention window W of the checkpoint, None = full causal; megaent runs sequences of <= W tokens only."""
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    num_experts: int = 0
    """Experts per MoE layer (every layer is MoE when > 0); 0 = dense."""
    experts_per_token: int = 0
    """Top-k experts each token is routed to."""
    moe_intermediate_size: int = 0
    """Intermediate size of one expert's SwiGLU."""
    moe_renormalize: bool = True
    """Top-k routing weights renormalised to sum 1 (else the softmax over all experts, as Qwen3 with
    norm_topk_prob=false)."""
    router_aux_loss_coef: float = 0.0
    """The checkpoint's load-balancing loss coefficient (HF `router_aux_loss_coef`; used by training only)."""
    output_router_logits: bool = False
    """HF `output_router_logits`: HF adds `router_aux_loss_coef` x the load-balancing loss to the training loss
    only when it is true; megaent's update does the same (`megaent.model.moe.aux_loss_coef`)."""
    dtype: Optional[str] = None
    """Checkpoint dtype from config.json (`dtype` or `torch_dtype`), e.g. "bfloat16"; None when absent."""
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The raw config.json this was parsed from (kept so export preserves every original field)."""

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def local_kv_heads(self, tp: int) -> int:
        """KV heads one TP rank attends with: KV / tp, or 1 when tp > KV (each rank works for one KV head,
        its k/v weight rows being a 1/(tp/KV) slice of that head; see `megaent.model.layers.SelfAttention`)."""
        return max(1, self.num_key_value_heads // tp)

    def check_sequence_length(self, length: int) -> None:
        """Raise ConfigError when a sequence of `length` tokens would need the checkpoint's sliding window."""
        w = self.sliding_window
        if w is not None and length > w:
            from megaent.config.errors import ConfigError

            raise ConfigError(
                f"config.json sliding_window={w}: a sequence of {length} tokens exceeds it, and megaent attends over "
                f"the full causal context, which equals the checkpoint's sliding-window attention only up to {w} "
                f"tokens; keep prompt + response <= {w} (rollout.max_new_tokens and the prompt length), or use a "
                f"checkpoint trained without the window (sliding_window null, e.g. Mistral v0.2 and later)")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        """Parse a config.json dict (either spelling); raise ValueError on anything unsupported."""
        _reject_unsupported(cfg)
        model_type = cfg["model_type"]
        hidden, heads = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        if heads % kv_heads != 0:
            raise ValueError(f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads="
                             f"{kv_heads}; grouped-query attention needs whole groups")
        theta, rope_type, scaling = _parse_rope(cfg)
        fam = FAMILIES[model_type]
        qkv_bias = fam.qkv_bias if fam.qkv_bias is not None else bool(cfg.get("attention_bias", False))
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        return cls(
            model_type=model_type, vocab_size=_req(cfg, "vocab_size"), hidden_size=hidden,
            intermediate_size=_req(cfg, "intermediate_size"), num_hidden_layers=_req(cfg, "num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type,
            rope_scaling=scaling, qkv_bias=qkv_bias, qk_norm=fam.qk_norm, sliding_window=_sliding_window(cfg, fam),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), **_moe_fields(cfg, fam),
            dtype=str(dtype) if dtype is not None else None, hf_config=dict(cfg),
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "ModelArch":
        """Read `<hf_dir>/config.json`."""
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: model.path must be a HuggingFace checkpoint directory")
        return cls.from_hf_config(json.loads(path.read_text()))

    def check_layout(self, *, tp: int, pp: int, pipeline_layers: Optional[list[int]] = None) -> None:
        """Raise ValueError when this model cannot be split over `tp` x `pp` (message names parallel.tp/pp)."""
        if self.num_attention_heads % tp != 0:
            raise ValueError(f"parallel.tp={tp} does not divide num_attention_heads={self.num_attention_heads}; "
                             f"choose a tp that divides it")
        kv = self.num_key_value_heads
        if kv % tp != 0 and (tp % kv != 0 or self.head_dim % (tp // kv) != 0):
            # tp > KV: each KV head's rows are split over tp / KV ranks, which gather them back (megatron-core's
            # scheme for tp > num_query_groups), so tp must be a multiple of KV that also splits head_dim.
            raise ValueError(f"parallel.tp={tp} does not divide num_key_value_heads={kv}, nor is it a multiple of "
                             f"it that splits head_dim={self.head_dim}; use a tp that divides {kv} or a multiple "
                             f"of {kv} dividing {kv * self.head_dim}")
        ffn = self.moe_intermediate_size if self.num_experts else self.intermediate_size
        if ffn % tp != 0:
            raise ValueError(f"parallel.tp={tp} does not divide the MLP intermediate size {ffn}")
        stage_layer_ranges(self.num_hidden_layers, pp, pipeline_layers)

    def check_experts(self, ep: int) -> None:
        """Raise ValueError when `ep` (parallel.ep) cannot split this model's experts evenly."""
        if ep == 1:
            return
        if not self.num_experts:
            raise ValueError(f"parallel.ep={ep} needs an MoE checkpoint; {self.model_type} has no experts (use ep=1)")
        if self.num_experts % ep != 0:
            raise ValueError(f"parallel.ep={ep} does not divide the number of experts {self.num_experts}; choose an "
                             f"ep that divides it")

    def to_hf_config(self, *, dtype: Optional[str] = None) -> dict[str, Any]:
        """A transformers-5 style config.json dict; the original fields are kept when parsed from HF."""
        if self.hf_config:
            cfg = dict(self.hf_config)
            if dtype is not None:
                cfg["torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"] = dtype
            return cfg
        arch_name = FAMILIES[self.model_type].hf_class
        cfg: dict[str, Any] = {
            "architectures": [arch_name], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope_scaling},
        }
        if FAMILIES[self.model_type].qkv_bias is None:
            cfg["attention_bias"] = self.qkv_bias
        if self.sliding_window is not None:
            cfg["sliding_window"] = self.sliding_window
            if not FAMILIES[self.model_type].window_always:
                cfg["use_sliding_window"] = True
        if dtype or self.dtype:
            cfg["dtype"] = dtype or self.dtype
        return cfg


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json has no {key!r}; megaent needs it to build the model")
    return cfg[key]


def _reject_unsupported(cfg: dict[str, Any]) -> None:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json model_type={mt!r} is not supported; megaent supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (dense decoders)")
    bad_layers = sorted({t for t in cfg.get("layer_types") or [] if t not in ("full_attention", "sliding_attention")})
    if bad_layers:
        raise ValueError(f"config.json layer_types contains {bad_layers}; megaent supports 'full_attention' and "
                         f"'sliding_attention' (up to the window) only")
    if FAMILIES[mt].moe is not None:
        _reject_unsupported_moe(cfg)
    for key in _MOE_KEYS if FAMILIES[mt].moe is None else ():
        if cfg.get(key):
            raise ValueError(f"config.json {key}={cfg[key]!r}: mixture-of-experts models are not supported; "
                             f"model_type={mt!r} is dense in megaent; the MoE families are qwen3_moe and mixtral")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported; megaent implements SwiGLU ('silu')")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported; megaent's MLP has no bias")
    for key in ("partial_rotary_factor",):
        val = cfg.get(key, (cfg.get("rope_parameters") or {}).get(key, 1.0))
        if val not in (None, 1.0, 1):
            raise ValueError(f"config.json {key}={val!r} is not supported; megaent rotates the whole head (1.0)")


def _reject_unsupported_moe(cfg: dict[str, Any]) -> None:
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError(f"config.json decoder_sparse_step={cfg.get('decoder_sparse_step')} / mlp_only_layers="
                         f"{cfg.get('mlp_only_layers')}: megaent builds MoE in every layer (step 1, no dense layers)")
    if cfg.get("router_jitter_noise"):
        raise ValueError(f"config.json router_jitter_noise={cfg['router_jitter_noise']}: megaent's router has no "
                         f"jitter; set it to 0.0")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("config.json shared_expert_intermediate_size: shared experts are not supported")


def _moe_fields(cfg: dict[str, Any], fam: Family) -> dict[str, Any]:
    """The MoE fields of ModelArch (empty for dense families)."""
    moe = fam.moe
    if moe is None:
        return {}
    renorm = moe.renormalize if moe.renormalize is not None else bool(cfg.get("norm_topk_prob", False))
    key = next((k for k in moe.experts_keys if cfg.get(k)), moe.experts_keys[0])
    return dict(num_experts=int(_req(cfg, key)), experts_per_token=int(_req(cfg, "num_experts_per_tok")),
                moe_intermediate_size=int(_req(cfg, moe.size_key)), moe_renormalize=renorm,
                router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
                output_router_logits=bool(cfg.get("output_router_logits", False)))


def _sliding_window(cfg: dict[str, Any], fam: Family) -> Optional[int]:
    """The attention window that applies to this checkpoint (see the module docstring), None = none."""
    w = cfg.get("sliding_window")
    used = fam.window_always or bool(cfg.get("use_sliding_window")) or \
        "sliding_attention" in (cfg.get("layer_types") or [])
    # Qwen2/3 apply the window from layer max_window_layers on only; refusing sequences > W covers every layer.
    return None if not used or w is None else int(w)


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, str, dict[str, float]]:
    """(theta, rope_type, scaling keys) from `rope_parameters` (transformers 5) or top-level keys (older)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
        key = "rope_parameters"
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or {}
        key = "rope_scaling"
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json {key} rope_type={rope_type!r} is not supported; megaent supports "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    kept: dict[str, float] = {}
    for k in _ROPE_KEYS[rope_type]:
        if k not in scaling:
            if k == "original_max_position_embeddings" and "max_position_embeddings" in cfg:
                kept[k] = int(cfg["max_position_embeddings"])
                continue
            raise ValueError(f"config.json {key} with rope_type={rope_type!r} needs {k!r}")
        kept[k] = int(scaling[k]) if k == "original_max_position_embeddings" else float(scaling[k])
    return float(theta), rope_type, kept


def stage_layer_ranges(num_layers: int, pp: int, pipeline_layers: Optional[list[int]] = None) -> list[range]:
    """Global decoder-layer indices of each pipeline stage.

    Default: an even split; when `num_layers % pp != 0` the first stages get one
    extra layer each (the last stage also carries the LM head). `pipeline_layers`
    gives the count per stage explicitly (zeros allowed) and must sum to `num_layers`.
    """
    if pipeline_layers is None:
        if pp > num_layers:
            raise ValueError(f"parallel.pp={pp} exceeds num_hidden_layers={num_layers}; use pp <= {num_layers} "
                             f"or set model.pipeline_layers explicitly")
        base, extra = divmod(num_layers, pp)
        counts = [base + (1 if s < extra else 0) for s in range(pp)]
    else:
        counts = list(pipeline_layers)
        if len(counts) != pp or any(c < 0 for c in counts) or sum(counts) != num_layers:
            raise ValueError(f"model.pipeline_layers={counts} must list {pp} non-negative counts (one per "
                             f"parallel.pp stage) summing to num_hidden_layers={num_layers}")
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(st, st + c) for st, c in zip(starts, counts)]
