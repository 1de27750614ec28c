"""1F1B and forward-only pipeline schedules vs a plain single-process model.

A small stand-in LM (embedding, residual MLP blocks, tied or untied head)
is built from megatron-core TP layers and split over TP x PP; its weights are
slices of a full plain-torch model (`RefLM`) that runs in one process. On
(TP, PP, DP) = (1,4,1), (2,2,1), (1,2,2) with 1 or 3 micro-batches (fewer
micro-batches than stages exercises the warm-up limit), the pipeline's
loss, forward-only log-probs, DP/tied-reduced grads and global grad norm must
match the reference (fp32, tolerance 1e-5: only summation order differs).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_pipeline.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist import run_ranks

V, H, FF, LAYERS = 16, 8, 16, 4


class RefLM(torch.nn.Module):
    """Full single-process model: emb -> LAYERS x (x + W2 gelu(W1 LN(x))) -> LN -> head (tied: emb.T)."""

    def __init__(self, seed: int, tied: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g) * 0.5)  # noqa: E731
        self.tied = tied
        self.emb = r(V, H)
        self.head = None if tied else r(V, H)
        self.ln_w = torch.nn.ParameterList([r(H) + 1 for _ in range(LAYERS + 1)])
        self.ln_b = torch.nn.ParameterList([r(H) for _ in range(LAYERS + 1)])
        self.w1 = torch.nn.ParameterList([r(FF, H) for _ in range(LAYERS)])
        self.b1 = torch.nn.ParameterList([r(FF) for _ in range(LAYERS)])
        self.w2 = torch.nn.ParameterList([r(H, FF) for _ in range(LAYERS)])
        self.b2 = torch.nn.ParameterList([r(H) for _ in range(LAYERS)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb[ids]
        for i in range(LAYERS):
            y = F.layer_norm(x, (H,), self.ln_w[i], self.ln_b[i])
            x = x + F.linear(F.gelu(F.linear(y, self.w1[i], self.b1[i])), self.w2[i], self.b2[i])
        x = F.layer_norm(x, (H,), self.ln_w[LAYERS], self.ln_b[LAYERS])
        return F.linear(x, self.emb if self.tied else self.head)


class StageLM(torch.nn.Module):
    """The local TP shard of pipeline stage `state.pp_rank` of RefLM, from megatron-core TP layers."""

    def __init__(self, ref: RefLM, state) -> None:
        super().__init__()
        from megatron.core import tensor_parallel as tpl
        from megatron.core.model_parallel_config import ModelParallelConfig

        cfg = ModelParallelConfig(tensor_model_parallel_size=state.tp, use_cpu_initialization=True,
                                  perform_initialization=True)  # False would skip tensor_model_parallel attrs
        init = lambda w: None  # noqa: E731 (weights are copied from the reference below)
        self.state, self.tied = state, ref.tied
        t, tp = state.tp_rank, state.tp
        rows = lambda w: w.detach()[t * w.shape[0] // tp:(t + 1) * w.shape[0] // tp]  # noqa: E731
        per = LAYERS // state.pp
        self.layer_ids = list(range(state.pp_rank * per, (state.pp_rank + 1) * per))
        self.blocks = torch.nn.ModuleList()
        with torch.no_grad():
            if state.is_first_stage:
                self.emb = tpl.VocabParallelEmbedding(V, H, init_method=init, config=cfg)
                self.emb.weight.copy_(rows(ref.emb))
                if ref.tied and state.pp > 1:
                    self.emb.weight.shared_embedding = True
            for i in self.layer_ids:
                ln = torch.nn.LayerNorm(H)
                ln.weight.copy_(ref.ln_w[i]), ln.bias.copy_(ref.ln_b[i])
                c = tpl.ColumnParallelLinear(H, FF, config=cfg, init_method=init, bias=True, gather_output=False)
                c.weight.copy_(rows(ref.w1[i])), c.bias.copy_(rows(ref.b1[i]))
                r = tpl.RowParallelLinear(FF, H, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                          skip_bias_add=False)
                r.weight.copy_(rows(ref.w2[i].T).T), r.bias.copy_(ref.b2[i])
                self.blocks.append(torch.nn.ModuleList([ln, c, r]))
            if state.is_last_stage:
                self.ln_f = torch.nn.LayerNorm(H)
                self.ln_f.weight.copy_(ref.ln_w[LAYERS]), self.ln_f.bias.copy_(ref.ln_b[LAYERS])
                if ref.tied and state.pp == 1:
                    self.head_w = self.emb.weight
                else:
                    self.head_w = torch.nn.Parameter(rows(ref.emb if ref.tied else ref.head).clone())
                    self.head_w.tensor_model_parallel = True
                    if ref.tied:
                        self.head_w.shared_embedding = True

    def forward(self, input_ids=None, hidden_states=None):
        from megatron.core import tensor_parallel as tpl

        x = self.emb(input_ids) if self.state.is_first_stage else hidden_states
        for ln, c, r in self.blocks:
            x = x + r(F.gelu(c(ln(x))[0]))[0]
        if not self.state.is_last_stage:
            return x
        return tpl.copy_to_tensor_model_parallel_region(self.ln_f(x)) @ self.head_w.T  # [B, S, Vl]

    def ref_slices(self, ref: RefLM) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(local param, the matching slice of the reference grad) for every local parameter."""
        t, tp = self.state.tp_rank, self.state.tp
        rows = lambda w: w[t * w.shape[0] // tp:(t + 1) * w.shape[0] // tp]  # noqa: E731
        out = []
        if self.state.is_first_stage:
            out.append((self.emb.weight, rows(ref.emb.grad)))
        for i, (ln, c, r) in zip(self.layer_ids, self.blocks):
            out += [(ln.weight, ref.ln_w[i].grad), (ln.bias, ref.ln_b[i].grad), (c.weight, rows(ref.w1[i].grad)),
                    (c.bias, rows(ref.b1[i].grad)), (r.weight, rows(ref.w2[i].grad.T).T), (r.bias, ref.b2[i].grad)]
        if self.state.is_last_stage:
            out += [(self.ln_f.weight, ref.ln_w[LAYERS].grad), (self.ln_f.bias, ref.ln_b[LAYERS].grad)]
            if not (ref.tied and self.state.pp == 1):
                out.append((self.head_w, rows((ref.emb if ref.tied else ref.head).grad)))
        return out


class _GatherVocab(torch.autograd.Function):
    """All-gather the last dim over TP forward; keep this rank's slice of the grad backward."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group, ctx.n = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        r = dist.get_rank(ctx.group)
        return g[..., r * ctx.n:(r + 1) * ctx.n], None


def tp_logprobs(logits: torch.Tensor, targets: torch.Tensor, state) -> torch.Tensor:
    """Plain log-probs from vocab-sharded logits: gather the vocab (autograd-aware), log_softmax."""
    full = _GatherVocab.apply(logits, state.tp_group) if state.tp > 1 else logits
    return torch.log_softmax(full.float(), -1).gather(-1, targets[..., None])[..., 0]


def make_samples(seed: int, n: int):
    from megaent.trainer.batching import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        L = int(torch.randint(4, 9, (1,), generator=g))
        p = int(torch.randint(1, L - 1, (1,), generator=g))
        out.append(TrainSample(tokens=torch.randint(0, V, (L,), generator=g), prompt_len=p,
                               advantage=float(torch.randn(1, generator=g)), group=k // 2, uid=k))
    return out


def ref_step(ref: RefLM, samples) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Reference loss = -sum(adv * logp over response tokens) / total response tokens; backward on `ref`."""
    denom = sum(s.response_len for s in samples)
    loss, lps = 0.0, {}
    for s in samples:
        lp = torch.log_softmax(ref(s.tokens[None, :-1]), -1)[0].gather(-1, s.tokens[1:, None])[:, 0]
        lp = lp[s.prompt_len - 1:]
        lps[s.uid] = lp.detach()
        loss = loss + (-(s.advantage * lp).sum()) / denom
    loss.backward()
    return loss.detach(), lps


def _pipeline_case(tp, pp, n_micro, tied):
    from megaent.parallel import init_parallel
    from megaent.parallel.grads import reduce_gradients
    from megaent.parallel.pipeline import broadcast_from_last_stage, forward_backward_1f1b, forward_only
    from megaent.trainer.batching import make_micro_batches, partition_groups, unpack_response
    from megaent.config.schema import OptimizerConfig
    from megaent.trainer.optimizer import build_optimizer

    st = init_parallel(tp, pp)
    samples = make_samples(seed=tp * 10 + pp + n_micro, n=8)
    ref = RefLM(seed=3, tied=tied)
    ref_loss, ref_lps = ref_step(ref, samples)
    ref_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))

    model = StageLM(ref, st)
    mine = partition_groups(samples, st.dp)[st.dp_rank]
    budget = -(-sum(len(s) for s in mine) // n_micro)
    mbs = make_micro_batches(mine, max_tokens=max(budget, max(len(s) for s in mine)), dp_group=st.dp_group)
    denom = float(sum(s.response_len for s in samples))
    stage = lambda mb, x: model(input_ids=mb.input_ids, hidden_states=x)  # noqa: E731

    def loss_fn(logits, mb):
        lp = tp_logprobs(logits, mb.targets, st)
        loss = -(mb.advantages * lp * mb.mask).sum() / denom
        return loss, {"loss": loss.detach()}

    stats = forward_backward_1f1b(stage, mbs, loss_fn=loss_fn, state=st, hidden_size=H)
    reduce_gradients(model, state=st, bucket_mb=1e-4)  # tiny buckets: several all-reduces
    opt = build_optimizer(model, cfg=OptimizerConfig(lr=1e-3), state=st)
    norm = opt.grad_norm()
    grad_err = max(float((p.grad - g).abs().max()) for p, g in model.ref_slices(ref))

    lps = forward_only(stage, mbs, output_fn=lambda lg, mb: tp_logprobs(lg, mb.targets, st), state=st,
                       hidden_size=H)
    lps = broadcast_from_last_stage(lps if st.is_last_stage else None, [mb.mask for mb in mbs], state=st)
    lp_err = 0.0
    for mb, lp in zip(mbs, lps):
        for uid, v in unpack_response(lp, mb).items():
            lp_err = max(lp_err, float((v - ref_lps[uid]).abs().max()))
    loss = torch.stack([s["loss"] for s in stats]).sum() if stats else torch.zeros(())
    return dict(grad_err=grad_err, lp_err=lp_err, norm=float(norm), ref_norm=float(ref_norm), loss=float(loss),
                ref_loss=float(ref_loss), last=st.is_last_stage, n_mb=len(mbs))


def _pipeline_world4(rank, world):
    import torch.distributed as dist

    out = {}
    for tp, pp, n_micro, tied in [(1, 4, 3, True), (1, 4, 1, False), (2, 2, 3, True), (1, 2, 2, True)]:
        res = _pipeline_case(tp, pp, n_micro, tied)
        # Loss summed over the last stages of all DP replicas (TP ranks hold copies: count tp_rank 0 only).
        from megatron.core import parallel_state as mps

        own = res["loss"] if res["last"] and mps.get_tensor_model_parallel_rank() == 0 else 0.0
        tot = torch.tensor([own])
        dist.all_reduce(tot)
        res["loss_total"] = float(tot)
        out[(tp, pp, n_micro, tied)] = res
    return out


@pytest.mark.slow
def test_pipeline_matches_single_process_reference():
    results = run_ranks(_pipeline_world4, 4)
    for rank_res in results:
        for case, r in rank_res.items():
            assert r["grad_err"] < 1e-5, (case, r)
            assert r["lp_err"] < 1e-5, (case, r)
            assert abs(r["norm"] - r["ref_norm"]) < 1e-5 * max(1.0, r["ref_norm"]), (case, r)
            assert abs(r["loss_total"] - r["ref_loss"]) < 1e-5, (case, r)


def test_single_process_schedule_is_plain_backward():
    """World of one: the schedule reduces to forward + backward per micro-batch (grads vs reference)."""
    import os
    from megaent.parallel.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        r = _pipeline_case(1, 1, 2, True)
    finally:
        from megaent.parallel import destroy_parallel

        destroy_parallel()
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
    assert r["grad_err"] < 1e-5 and r["lp_err"] < 1e-5 and r["n_mb"] >= 2
    assert abs(r["loss"] - r["ref_loss"]) < 1e-5 and abs(r["norm"] - r["ref_norm"]) < 1e-5
