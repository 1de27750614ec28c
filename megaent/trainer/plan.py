"""`megaent plan`: the memory of one training rank of a config's layout, before the job is queued.

`plan_memory(cfg, ...)` counts, per pipeline stage (every TP and DP rank of a stage holds the same), in bytes:

- params: this rank's parameter shard in `model.dtype` (embedding on the first stage, final norm and LM head
  on the last; a tied head on a PP > 1 last stage is its own copy, as in megatron-core);
- main_grads: megatron-core DDP's contiguous fp32 gradient buffer (`grad_reduce_in_fp32`; full size on every
  DP rank, the distributed optimizer reduce-scatters inside it);
- optimizer: Adam's two fp32 moments, plus fp32 main parameters when the parameters are not fp32, divided
  over DP with the distributed optimizer (`optimizer.distributed_optimizer`, on by default when DP > 1);
- activations: what the backward keeps per micro-batch of `trainer.max_tokens_per_micro_batch` tokens, per
  decoder layer, by the saved tensors of megatron-core's layer (norm inputs in fp32, QKV, RoPE'd q/k, the
  attention output, the SwiGLU's three [T, I/TP] tensors), sharded over TP with sequence parallelism (on
  whenever TP > 1), reduced by `model.activation_checkpointing` (selective: the core attention's internals;
  full: each layer keeps only its input, one layer is recomputed at a time); with PP, 1F1B keeps
  `pp - stage` micro-batches in flight;
- head: the last stage's fused vocab-chunked head (`trainer.head_chunk_size` columns at a time: the gathered
  final hidden states, the [T, C] fp32 chunk buffers, grad_hidden and the transient [V/TP, H] weight gradient);
- workspace: one layer's transient gradients in the backward;
- rollout: a colocated rollout engine's share of the GPU: SGLang launched by the trainer on the training node
  (`rollout.engine=sglang` without `slurm.rollout_nodes`) takes `rollout.sglang_mem_fraction` of the GPU it
  shares; the embedded engine's KV cache for `max_batch_rows` rows. Rollout servers on their own nodes
  (`slurm.rollout_nodes > 0`, or `rollout.engine=http`) take nothing here.

Model shapes come from `model.path`/config.json when it exists, else from `SHAPES` by the path's last name
(the shipped recipes' published Qwen2.5 shapes), so the recipes plan without their checkpoints. When the total
does not fit `gpu_mem_gb`, `suggest` searches the smallest change (activation recompute, micro-batch tokens,
TP, PP, in that order of cost) and prints it as the overrides to use. No torch import: `megaent plan` is fast.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

GIB = 1024 ** 3

SHAPES: dict[str, dict[str, Any]] = {
    # config.json values of the published checkpoints (huggingface.co/Qwen/<name>/blob/main/config.json)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
    "qwen2.5-32b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        tie_word_embeddings=False),
    # the demo's own tiny policy (megaent.data.warmup defaults; vocab = the task tokenizer's, about 30)
    "demo": dict(model_type="llama", vocab_size=32, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """The decoder dimensions the planner needs (a subset of `megaent.model.arch.ModelArch`)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    qkv_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, c: dict[str, Any], name: str) -> "Shape":
        heads = c["num_attention_heads"]
        return cls(name=name, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                   intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
                   tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))


def model_shape(model_path: str) -> Shape:
    """config.json of `model_path` when present, else `SHAPES` by its last path component (case-insensitive)."""
    if not model_path:
        return Shape.from_hf_config(SHAPES["demo"], "demo")
    cfg_file = Path(model_path) / "config.json"
    if cfg_file.is_file():
        return Shape.from_hf_config(json.loads(cfg_file.read_text()), str(model_path))
    key = Path(model_path.rstrip("/")).name.lower()
    if key not in SHAPES:
        from megaent.config.errors import ConfigError

        raise ConfigError(f"model.path={model_path!r}: no config.json there and {key!r} is not a known shape "
                         f"({', '.join(sorted(SHAPES))}); point model.path at a HuggingFace checkpoint directory")
    return Shape.from_hf_config(SHAPES[key], key)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    distributed_optimizer: bool
    recompute: str
    tokens: int
    """Tokens per micro-batch (`trainer.max_tokens_per_micro_batch`)."""
    micro_batches: int
    """Micro-batches per optimizer step and DP rank (bounds what 1F1B keeps in flight)."""


@dataclass
class StagePlan:
    stage: int
    layers: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    shape: Shape
    layout: Layout
    dtype: str
    gpu_mem_gb: float
    stages: list[StagePlan]
    rollout_note: str = ""

    @property
    def peak(self) -> int:
        return max(s.total for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_mem_gb * GIB


def _stage_layers(n: int, pp: int) -> list[int]:
    base, extra = divmod(n, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def padded_vocab(v: int, tp: int, multiple: int = 1) -> int:
    step = tp * multiple
    return -(-v // step) * step


def layer_params(s: Shape, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank."""
    h, d, n, kv, i = s.hidden_size, s.head_dim, s.num_attention_heads, s.num_key_value_heads, s.intermediate_size
    qkv = (n + 2 * kv) * d
    return (h * qkv + (qkv if s.qkv_bias else 0) + n * d * h + 3 * i * h) // tp + 2 * h


def layer_activation_bytes(s: Shape, tokens: int, tp: int, b: int, recompute: str, *, sp: bool) -> int:
    """Bytes one decoder layer keeps for the backward of a `tokens`-token micro-batch on one TP rank."""
    h, d, n, kv, i = s.hidden_size, s.head_dim, s.num_attention_heads, s.num_key_value_heads, s.intermediate_size
    t_sp = tokens / tp if sp else tokens  # the norm / residual region is sequence-sharded with SP
    if recompute == "full":
        return int(t_sp * h * b)  # the layer's input only
    # each RMSNorm keeps its fp32 input copy (the input itself in fp32), its normalised output and the next
    # linear's input; two norms per layer
    norms = 2 * t_sp * h * (4 + 2 * b)
    qkv = tokens * (n + 2 * kv) * d // tp * b  # the fused QKV output (q, k, v are views of it)
    rope = tokens * (n + kv) * d // tp * b  # rotated q and k
    attn_out = tokens * n * d // tp * b  # core attention output = linear_proj's input
    attn_inner = tokens * n // tp * 4 + tokens * (n + 2 * kv) * d // tp * b  # log-sum-exp, SDPA's copies
    mlp = tokens * 4 * i // tp * b  # fc1 out [2I], silu(gate) [I], product [I] = fc2's input
    if recompute == "selective":
        attn_inner = 0
    return int(norms + qkv + rope + attn_out + attn_inner + mlp)


def head_bytes(s: Shape, tokens: int, tp: int, b: int, chunk: int, *, fused: bool = True) -> int:
    """Last stage, the LM head's peak extra bytes of one micro-batch (forward state + backward transients)."""
    h, vl = s.hidden_size, padded_vocab(s.vocab_size, tp) // tp
    final_norm = tokens / tp * h * (4 + 2 * b) if tp > 1 else tokens * h * (4 + 2 * b)
    gathered = tokens * h * b  # final hidden states gathered over TP (the head's saved input)
    if fused:
        c = min(chunk, vl)
        # one [T, C] chunk at a time: its logits in dtype, their fp32 copy (bf16/fp16 only), exp in fp32
        chunks = tokens * c * (b + 4 + (4 if b != 4 else 0))
        grads = tokens * h * 4 + vl * h * b  # grad_hidden accumulator and the [Vl, H] weight gradient
        return int(final_norm + gathered + chunks + grads)
    # full logits: [T, Vl] in dtype, its fp32 copy, log-softmax, softmax and its gradient
    return int(final_norm + gathered + tokens * vl * (b + 4 * 4) + vl * h * b)


def rollout_share(cfg: Any, s: Shape, tp: int, pp: int, b: int, gpu_mem_gb: float) -> tuple[int, str]:
    """Bytes the colocated rollout engine takes on the busiest training GPU, and where that comes from."""
    r = cfg.rollout
    if r.engine == "http" or cfg.slurm.rollout_nodes > 0:
        return 0, "rollout servers on their own nodes (rollout.engine=http or slurm.rollout_nodes > 0): 0 here"
    if r.engine == "sglang":
        return int(r.sglang_mem_fraction * gpu_mem_gb * GIB), (
            f"SGLang launched on the training node shares GPUs 0..{r.sglang_tp - 1}: rollout.sglang_mem_fraction="
            f"{r.sglang_mem_fraction} of {gpu_mem_gb:g} GB (set slurm.rollout_nodes to move it off)")
    rows, seq = 256, cfg.data.max_prompt_len + r.max_new_tokens  # EmbeddedEngine(max_batch_rows=256)
    kv = 2 * math.ceil(s.num_hidden_layers / pp) * max(1, s.num_key_value_heads // tp) * s.head_dim * b
    return rows * seq * kv, f"embedded engine's KV cache: 256 rows x {seq} tokens"


def _world(cfg: Any, world: Optional[int]) -> int:
    if world:
        return world
    per = cfg.slurm.gpus_per_node or cfg.slurm.tasks_per_node or 1
    return max(1, cfg.slurm.nodes * per)


def plan_memory(cfg: Any, *, gpu_mem_gb: float = 80.0, world: Optional[int] = None, tp: Optional[int] = None,
                pp: Optional[int] = None, recompute: Optional[str] = None, tokens: Optional[int] = None,
                shape: Optional[Shape] = None, include_rollout: bool = True,
                micro_batches: Optional[int] = None) -> Plan:
    """The memory plan of `cfg` (a `megaent.config.schema.Config`) per pipeline stage; see the module docstring.
    world: training ranks (default slurm.nodes x slurm.gpus_per_node); tp/pp/recompute/tokens override cfg."""
    s = shape or model_shape(cfg.model.path)
    tp = tp or cfg.parallel.tp
    pp = pp or cfg.parallel.pp
    n_world = _world(cfg, world)
    if n_world % (tp * pp):
        from megaent.config.errors import ConfigError

        raise ConfigError(f"world size {n_world} (slurm.nodes x slurm.gpus_per_node, or --world) is not a multiple of "
                          f"parallel.tp x parallel.pp = {tp * pp}")
    dp = n_world // (tp * pp)
    recompute = recompute or cfg.model.activation_checkpointing
    tokens = tokens or cfg.trainer.max_tokens_per_micro_batch
    distopt = dp > 1 if cfg.optimizer.distributed_optimizer is None else bool(cfg.optimizer.distributed_optimizer)
    dtype = cfg.model.dtype
    b = DTYPE_BYTES[dtype]
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    seqs = cfg.trainer.mini_batch_size * cfg.rollout.n_samples / dp
    micro = micro_batches or max(1, math.ceil(seqs * seq / tokens))
    lay = Layout(tp=tp, pp=pp, dp=dp, distributed_optimizer=distopt, recompute=recompute, tokens=tokens,
                 micro_batches=micro)
    chunk = getattr(cfg.trainer, "head_chunk_size", 4096)
    share, note = rollout_share(cfg, s, tp, pp, b, gpu_mem_gb) if include_rollout else (0, "")
    vl_h = padded_vocab(s.vocab_size, tp) // tp * s.hidden_size
    sp = tp > 1
    stages = []
    for st, n_layers in enumerate(_stage_layers(s.num_hidden_layers, pp)):
        first, last = st == 0, st == pp - 1
        p = n_layers * layer_params(s, tp)
        p += vl_h if first else 0
        p += s.hidden_size if last else 0
        p += vl_h if last and not (s.tie_word_embeddings and pp == 1) else 0
        opt_bytes = 8 + (4 if b != 4 else 0)  # Adam m, v (+ fp32 main params of bf16 weights)
        in_flight = min(pp - st, micro)
        per_layer = layer_activation_bytes(s, tokens, tp, b, recompute, sp=sp)
        acts = in_flight * n_layers * per_layer
        full_layer = layer_activation_bytes(s, tokens, tp, b, "none", sp=sp)
        if recompute == "full":  # one layer's activations re-materialised in the backward
            acts += full_layer
        if not first:  # the received input of each micro-batch in flight
            acts += in_flight * int((tokens / tp if sp else tokens) * s.hidden_size * b)
        parts = {"params": p * b, "main_grads": p * 4, "optimizer": math.ceil(p * opt_bytes / (dp if distopt else 1)),
                 "activations": acts, "head": head_bytes(s, tokens, tp, b, chunk) if last else 0,
                 "workspace": full_layer // 2, "rollout": share if st == 0 else 0}
        stages.append(StagePlan(stage=st, layers=n_layers, parts=parts))
    return Plan(shape=s, layout=lay, dtype=dtype, gpu_mem_gb=gpu_mem_gb, stages=stages, rollout_note=note)


def suggest(cfg: Any, plan: Plan, **kw: Any) -> Optional[tuple[list[str], Plan]]:
    """The smallest change that makes `plan` fit: one change, else two, among activation recompute, fewer
    micro-batch tokens (down to 1/4), wider TP (heads must divide), more PP (within the world size), and the
    colocated rollout engine moved to its own node; returns (overrides, the plan with them) or None."""
    lay, s = plan.layout, plan.shape
    world = lay.tp * lay.pp * lay.dp
    order = ["none", "selective", "full"]
    single: list[tuple[list[str], dict[str, Any]]] = []
    if plan.stages[0].parts["rollout"]:
        single.append((["slurm.rollout_nodes=1"], {"include_rollout": False}))
    for rc in order[order.index(lay.recompute) + 1:]:
        single.append(([f"model.activation_checkpointing={rc}"], {"recompute": rc}))
    for div in (2, 4):
        single.append(([f"trainer.max_tokens_per_micro_batch={lay.tokens // div}"], {"tokens": lay.tokens // div}))
    for tp in (2, 4, 8):
        if tp > lay.tp and world % (tp * lay.pp) == 0 and s.num_attention_heads % tp == 0:
            single.append(([f"parallel.tp={tp}"], {"tp": tp}))
    for pp in (2, 4, 8):
        if pp > lay.pp and world % (lay.tp * pp) == 0 and s.num_hidden_layers >= pp:
            single.append(([f"parallel.pp={pp}"], {"pp": pp}))
    pairs = [(a[0] + b[0], {**a[1], **b[1]}) for i, a in enumerate(single) for b in single[i + 1:]
             if not set(a[1]) & set(b[1])]
    for ov, change in single + pairs:
        p = plan_memory(cfg, gpu_mem_gb=plan.gpu_mem_gb, world=world, shape=s, **{**kw, **change})
        if p.fits:
            return ov, p
    return None


def render(plan: Plan) -> str:
    """The plan as a table (GiB per stage) with the verdict."""
    lay = plan.layout
    gb = lambda x: f"{x / GIB:8.2f}"  # noqa: E731
    lines = [f"model {plan.shape.name}: {plan.shape.num_hidden_layers} layers, hidden {plan.shape.hidden_size}, "
             f"vocab {plan.shape.vocab_size}, {plan.dtype}",
             f"layout tp={lay.tp} pp={lay.pp} dp={lay.dp} distributed_optimizer={lay.distributed_optimizer} "
             f"recompute={lay.recompute} micro-batch tokens={lay.tokens} (sequence_parallel={lay.tp > 1}, "
             f"{lay.micro_batches} micro-batches per step and DP rank)"]
    keys = list(plan.stages[0].parts)
    lines.append("GiB per rank  " + " ".join(f"{k:>11}" for k in keys + ["total"]))
    for st in plan.stages:
        lines.append(f"stage {st.stage:<2} ({st.layers:>2} L)" + " ".join(f"{gb(st.parts[k]):>11}" for k in keys)
                     + f" {gb(st.total):>11}")
    if plan.rollout_note:
        lines.append(f"rollout: {plan.rollout_note}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"peak {plan.peak / GIB:.2f} GiB of {plan.gpu_mem_gb:g} GiB: {verdict}")
    return "\n".join(lines)


def plan_cli(config: str, overrides: list[str], *, gpu_mem_gb: float, world: Optional[int]) -> int:
    """`megaent plan`: print the plan; exit 0 when it fits, 1 (with the suggested overrides) when not."""
    from megaent.config import load_config

    cfg = load_config(config, overrides)
    plan = plan_memory(cfg, gpu_mem_gb=gpu_mem_gb, world=world)
    print(render(plan))
    if plan.fits:
        return 0
    found = suggest(cfg, plan)
    if found is None:
        print("no single change of recompute, micro-batch tokens, TP or PP fits; use more GPUs or nodes")
    else:
        ov, p = found
        print(f"smallest change that fits: {' '.join(ov)} (peak {p.peak / GIB:.2f} GiB)")
    return 1
