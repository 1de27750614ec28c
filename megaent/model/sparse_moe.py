"""`SparseMoE`: the mixture-of-experts MLP of megaent's own decoder (Qwen3-MoE, Mixtral), TP-split, EP = 1.

The forward of HF's `Qwen3MoeSparseMoeBlock` / `MixtralSparseMoeBlock` (transformers 5):
router logits = x W_r^T in the model dtype, softmax over the E experts in fp32, top-k of the probabilities,
renormalised over the k when `arch.moe_renormalize` (Mixtral; Qwen3-MoE with norm_topk_prob) and used as
they are otherwise; each token's output is the weighted sum of its k experts' SwiGLUs, added in expert
order. Only experts that got tokens run, each on its own tokens (sort by expert, index_select, one
index_add), so the cost is k expert MLPs per token, not E. HF's Mixtral multiplies the expert output by the
fp32 weight and casts; Qwen3-MoE first rounds the weight to the model dtype. We do Mixtral's for both: equal
in fp32, an ulp of bf16 apart otherwise.

Tensor parallel (Megatron-LM's MLP split, per expert): the router [E, H] is replicated; expert e's fused
`gate_up` [gate slice | up slice] (2 I/TP rows) is column-parallel and its `down` [H, I/TP] row-parallel,
exactly the dense `SwiGLU`'s layout, so `megaent.model.hf_names` (`_moe_parts`) fills both decoders from one
table: `moe.router.weight`, `moe.experts.{e}.gate_up.weight`, `moe.experts.{e}.down.weight`. Every rank
routes identically (replicated router on the same input), sums its partial expert outputs, and the block
ends in ONE all-reduce on tp_group (forward), like the dense MLP; backward: one all-reduce of dx. The router
weight's gradient on a rank is the part from its own slices of the experts (their sum over tp_group is the
full one, as for the q/k norm weights in `megaent.model.layers.SelfAttention`).

Expert parallelism is megatron-core's (`megaent.model.gpt_policy`); this decoder holds every expert.
One host sync per layer (the token count of each expert, to slice the sorted tokens).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)

from megaent.model.arch import ModelArch
from megaent.model.fused import swiglu


class _Weight(torch.nn.Module):
    """One weight [rows, cols] (filled by `megaent.model.policy`); `partition_dim` 0 / 1 marks a column- / row-
    parallel shard as megatron-core's layers do, None a replicated tensor."""

    def __init__(self, rows: int, cols: int, *, dtype: torch.dtype, partition_dim: int | None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(rows, cols, dtype=dtype))
        if partition_dim is not None:
            set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=partition_dim, stride=1)


class _Expert(torch.nn.Module):
    """This rank's shard of one expert's SwiGLU: gate_up [2 I/TP, H], down [H, I/TP]."""

    def __init__(self, hidden: int, inter_local: int, *, dtype: torch.dtype):
        super().__init__()
        self.gate_up = _Weight(2 * inter_local, hidden, dtype=dtype, partition_dim=0)
        self.down = _Weight(hidden, inter_local, dtype=dtype, partition_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> this rank's partial output [n, H] (summed over tp_group by the caller)."""
        return F.linear(swiglu(F.linear(x, self.gate_up.weight)), self.down.weight)


class SparseMoE(torch.nn.Module):
    """Top-k routed SwiGLU experts (module docstring); every expert on this rank, TP-split (the caller checked
    `arch.check_layout`: tp divides moe_intermediate_size)."""

    def __init__(self, arch: ModelArch, *, tp_group: dist.ProcessGroup, tp: int, dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = arch.num_experts, arch.experts_per_token, \
            arch.moe_renormalize
        self.tp_group = tp_group
        self.router = _Weight(arch.num_experts, arch.hidden_size, dtype=dtype, partition_dim=None)
        inter = arch.moe_intermediate_size // tp
        self.experts = torch.nn.ModuleList(_Expert(arch.hidden_size, inter, dtype=dtype)
                                           for _ in range(arch.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (router logits [T, E] in x's dtype, top-k weights [T, k] fp32, expert ids [T, k] long),
        as HF's router computes them. No collectives."""
        logits = F.linear(x, self.router.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H] in x's dtype. One all-reduce on tp_group (forward), one (backward)."""
        shape = x.shape
        x = copy_to_tensor_model_parallel_region(x.reshape(-1, shape[-1]), group=self.tp_group)  # [T, H]
        _, weights, ids = self.route(x)
        order = ids.reshape(-1).argsort(stable=True)  # [T*k] (token, choice) slots grouped by expert
        tokens = order // self.top_k  # [T*k] token of each sorted slot, ascending within an expert
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts).tolist()  # the host sync
        outs, start = [], 0
        for expert, n in zip(self.experts, counts):
            if n:
                outs.append(expert(x.index_select(0, tokens[start:start + n])))  # [n, H]
            start += n
        if outs:
            w = weights.reshape(-1).index_select(0, order)[:, None]  # [T*k, 1] fp32
            y = x.new_zeros(x.shape).index_add(0, tokens, (torch.cat(outs) * w).to(x.dtype))
        else:  # no tokens
            y = x.new_zeros(x.shape)
        return reduce_from_tensor_model_parallel_region(y, group=self.tp_group).view(shape)
