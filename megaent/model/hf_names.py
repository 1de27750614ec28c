"""HF <-> megaent parameter names and the tensor-parallel split/merge of each tensor.

A name table of templates (the litgpt `convert_hf_checkpoint` idea) maps each
megaent parameter to the HF tensors it is built from, each with a TP `kind`:

- "column":     split dim 0 evenly over TP (q/k/v, gate/up, their biases)
- "row":        split dim 1 evenly over TP (o_proj, down_proj)
- "vocab":      pad dim 0 to the padded vocabulary with zero rows, then split dim 0
- "replicated": every rank holds the whole tensor (norm weights)

Fused megaent parameters (attn.qkv, mlp.gate_up) list several HF parts; the
local shard is the concatenation of each part's local shard (see
`megaent.model.layers` for the layouts). Everything here is pure: tensors in,
tensors out, no process groups. `tp_slice` works on anything sliceable with a
shape, so `load_hf` passes safetensors slices and reads only the local rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from megaent.model.arch import ModelArch, stage_layer_ranges

KINDS = ("column", "row", "vocab", "replicated")


@dataclass(frozen=True)
class Part:
    hf_name: str
    kind: str
    shape: tuple[int, ...]
    """Full (unsharded, unpadded) HF shape."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    """megaent parameter name (`Policy.named_parameters()`)."""
    parts: tuple[Part, ...]


def padded_vocab_size(vocab_size: int, tp: int, *, multiple: int = 1) -> int:
    """Smallest size >= vocab_size divisible by tp * multiple (megatron splits the padded size evenly)."""
    unit = tp * multiple
    return -(-vocab_size // unit) * unit


def _layer_parts(arch: ModelArch, l: int, experts: Optional[range] = None) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    h, q, kv, i, d = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size, arch.head_dim
    p = f"model.layers.{l}."
    table = {
        f"layers.{l}.input_norm.weight": [(p + "input_layernorm.weight", "replicated", (h,))],
        f"layers.{l}.attn.qkv.weight": [(p + "self_attn.q_proj.weight", "column", (q, h)),
                                        (p + "self_attn.k_proj.weight", "column", (kv, h)),
                                        (p + "self_attn.v_proj.weight", "column", (kv, h))],
        f"layers.{l}.attn.qkv.bias": [(p + "self_attn.q_proj.bias", "column", (q,)),
                                      (p + "self_attn.k_proj.bias", "column", (kv,)),
                                      (p + "self_attn.v_proj.bias", "column", (kv,))],
        f"layers.{l}.attn.q_norm.weight": [(p + "self_attn.q_norm.weight", "replicated", (d,))],
        f"layers.{l}.attn.k_norm.weight": [(p + "self_attn.k_norm.weight", "replicated", (d,))],
        f"layers.{l}.attn.proj.weight": [(p + "self_attn.o_proj.weight", "row", (h, q))],
        f"layers.{l}.post_norm.weight": [(p + "post_attention_layernorm.weight", "replicated", (h,))],
        f"layers.{l}.mlp.gate_up.weight": [(p + "mlp.gate_proj.weight", "column", (i, h)),
                                           (p + "mlp.up_proj.weight", "column", (i, h))],
        f"layers.{l}.mlp.down.weight": [(p + "mlp.down_proj.weight", "row", (h, i))],
    }
    if not arch.qkv_bias:
        del table[f"layers.{l}.attn.qkv.bias"]
    if not arch.qk_norm:
        del table[f"layers.{l}.attn.q_norm.weight"], table[f"layers.{l}.attn.k_norm.weight"]
    if arch.num_experts:
        del table[f"layers.{l}.mlp.gate_up.weight"], table[f"layers.{l}.mlp.down.weight"]
        table.update(_moe_parts(arch, l, experts))
    return table


def _moe_parts(arch: ModelArch, l: int, experts: Optional[range] = None
               ) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """Router (replicated [E, H]) and the SwiGLU of each expert in `experts` (global ids; None = all, EP = 1),
    TP-split like the dense MLP."""
    from megaent.model.arch import FAMILIES

    names = FAMILIES[arch.model_type].moe
    h, i = arch.hidden_size, arch.moe_intermediate_size
    p = f"model.layers.{l}.{names.block}."
    table = {f"layers.{l}.moe.router.weight": [(p + "gate.weight", "replicated", (arch.num_experts, h))]}
    for e in range(arch.num_experts) if experts is None else experts:
        x = f"{p}experts.{e}."
        table[f"layers.{l}.moe.experts.{e}.gate_up.weight"] = [(x + f"{names.gate}.weight", "column", (i, h)),
                                                              (x + f"{names.up}.weight", "column", (i, h))]
        table[f"layers.{l}.moe.experts.{e}.down.weight"] = [(x + f"{names.down}.weight", "row", (h, i))]
    return table


def expert_range(arch: ModelArch, ep_rank: int, ep: int) -> range:
    """Global ids of the experts EP rank `ep_rank` of `ep` holds (contiguous, as megatron-core places them)."""
    n = arch.num_experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)


def is_expert_param(name: str) -> bool:
    """True for a megaent table name of one expert's weight (split over EP, not replicated over DP)."""
    return ".moe.experts." in name


def stage_param_specs(arch: ModelArch, *, layers: Iterable[int], first: bool, last: bool,
                      separate_head: bool, experts: Optional[range] = None) -> list[ParamSpec]:
    """Specs of one pipeline stage's parameters, in module order; MoE: the experts in `experts` (None = all).

    `separate_head`: the last stage owns a `head.weight` (untied, or tied with PP > 1 where it is
    initialised from the embedding tensor); False when the head reuses `embed.weight`.
    """
    v, h = arch.vocab_size, arch.hidden_size
    table: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    if first:
        table["embed.weight"] = [("model.embed_tokens.weight", "vocab", (v, h))]
    for l in layers:
        table.update(_layer_parts(arch, l, experts))
    if last:
        table["final_norm.weight"] = [("model.norm.weight", "replicated", (h,))]
        if separate_head:
            src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
            table["head.weight"] = [(src, "vocab", (v, h))]
    return [ParamSpec(name, tuple(Part(*p) for p in parts)) for name, parts in table.items()]


def model_param_specs(arch: ModelArch, *, pp: int = 1, pipeline_layers: Optional[list[int]] = None
                      ) -> list[list[ParamSpec]]:
    """Specs per pipeline stage (index = pp_rank)."""
    ranges = stage_layer_ranges(arch.num_hidden_layers, pp, pipeline_layers)
    return [stage_param_specs(arch, layers=r, first=s == 0, last=s == pp - 1,
                              separate_head=not arch.tie_word_embeddings or pp > 1) for s, r in enumerate(ranges)]


def _bounds(n: int, tp_rank: int, tp: int, what: str) -> tuple[int, int]:
    if n % tp != 0:
        raise ValueError(f"{what}: size {n} is not divisible by parallel.tp={tp}")
    step = n // tp
    return tp_rank * step, (tp_rank + 1) * step


def tp_slice(src: Any, shape: tuple[int, ...], kind: str, tp_rank: int, tp: int, *,
             padded_rows: Optional[int] = None, what: str = "tensor") -> torch.Tensor:
    """This rank's shard of a full tensor, reading only the needed rows/columns.

    `src` is anything indexable by slices (a tensor, a safetensors slice) with full shape `shape`.
    "vocab" needs `padded_rows` (>= shape[0], divisible by tp) and fills rows past shape[0] with zeros.
    """
    if kind == "replicated":
        return src[:]
    if kind == "column":
        a, b = _bounds(shape[0], tp_rank, tp, what)
        return src[a:b]
    if kind == "row":
        a, b = _bounds(shape[1], tp_rank, tp, what)
        return src[:, a:b]
    if kind == "vocab":
        if padded_rows is None:
            raise ValueError("tp_slice(kind='vocab') needs padded_rows")
        a, b = _bounds(padded_rows, tp_rank, tp, what)
        real = src[min(a, shape[0]):min(b, shape[0])]
        if real.shape[0] == b - a:
            return real
        pad = torch.zeros((b - a - real.shape[0], *shape[1:]), dtype=real.dtype, device=real.device)
        return torch.cat([real, pad], dim=0)
    raise ValueError(f"unknown TP kind {kind!r}; expected one of {KINDS}")


def split_tp(tensor: torch.Tensor, kind: str, tp_rank: int, tp: int, *,
             padded_rows: Optional[int] = None) -> torch.Tensor:
    """Shard `tensor` (full HF tensor) for `tp_rank` of `tp`; inverse of `merge_tp`."""
    return tp_slice(tensor, tuple(tensor.shape), kind, tp_rank, tp, padded_rows=padded_rows)


def merge_tp(shards: list[torch.Tensor], kind: str, *, rows: Optional[int] = None) -> torch.Tensor:
    """Full tensor from the TP shards (index = tp_rank); "vocab" drops padding past `rows`."""
    if kind == "replicated":
        return shards[0]
    if kind in ("column", "vocab"):
        full = torch.cat(shards, dim=0)
        return full[:rows] if kind == "vocab" and rows is not None else full
    if kind == "row":
        return torch.cat(shards, dim=1)
    raise ValueError(f"unknown TP kind {kind!r}; expected one of {KINDS}")


def local_rows(part: Part, tp: int, padded_rows: int) -> int:
    """Rows of `part` inside one TP shard of the fused parameter."""
    if part.kind == "vocab":
        return padded_rows // tp
    if part.kind == "column":
        return part.shape[0] // tp
    return part.shape[0]


def build_local(spec: ParamSpec, read: Callable[[Part], torch.Tensor]) -> torch.Tensor:
    """Local shard of one megaent parameter; `read(part)` returns the part's local shard (via tp_slice)."""
    pieces = [read(p) for p in spec.parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def unfuse_local(spec: ParamSpec, shard: torch.Tensor, tp: int, *, padded_rows: int) -> list[torch.Tensor]:
    """Split one rank's shard of a fused parameter back into its parts' local shards."""
    if len(spec.parts) == 1:
        return [shard]
    return list(shard.split([local_rows(p, tp, padded_rows) for p in spec.parts], dim=0))


def hf_to_megaent(hf_state: dict[str, torch.Tensor], arch: ModelArch, *, tp_rank: int = 0, tp: int = 1,
                  pp_rank: int = 0, pp: int = 1, pipeline_layers: Optional[list[int]] = None,
                  vocab_multiple: int = 1) -> dict[str, torch.Tensor]:
    """The megaent state dict of stage `pp_rank`, TP shard `tp_rank`, from a full HF state dict."""
    padded = padded_vocab_size(arch.vocab_size, tp, multiple=vocab_multiple)
    specs = model_param_specs(arch, pp=pp, pipeline_layers=pipeline_layers)[pp_rank]

    def read(part: Part) -> torch.Tensor:
        if part.hf_name not in hf_state:
            raise KeyError(f"HF state dict has no {part.hf_name!r}")
        return split_tp(hf_state[part.hf_name], part.kind, tp_rank, tp, padded_rows=padded)

    return {s.name: build_local(s, read) for s in specs}


def megaent_to_hf(tp_states: list[dict[str, torch.Tensor]], arch: ModelArch, *,
                  vocab_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Full HF state dict from megaent state dicts indexed by tp_rank (each may hold any set of stages).

    Padding rows are removed; a tied model exports no `lm_head.weight` (HF ties it on load).
    """
    tp = len(tp_states)
    padded = padded_vocab_size(arch.vocab_size, tp, multiple=vocab_multiple)
    specs = {s.name: s for stage in model_param_specs(arch, pp=1) for s in stage}
    specs["head.weight"] = ParamSpec("head.weight", (Part(
        "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight", "vocab",
        (arch.vocab_size, arch.hidden_size)),))
    out: dict[str, torch.Tensor] = {}
    for name in tp_states[0]:
        spec = specs.get(name)
        if spec is None:
            raise KeyError(f"megaent parameter {name!r} has no HF name in the table")
        if name == "head.weight" and arch.tie_word_embeddings:
            continue
        per_rank = [unfuse_local(spec, st[name], tp, padded_rows=padded) for st in tp_states]
        for j, part in enumerate(spec.parts):
            out[part.hf_name] = merge_tp([pr[j] for pr in per_rank], part.kind, rows=part.shape[0])
    return out
