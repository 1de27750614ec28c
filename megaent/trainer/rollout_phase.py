"""The rollout phase of an RL step: prompts -> samples on every rank, whatever the engine.

Engines (rollout.engine):
- embedded, PP = 1: the engine's KV-cached decoder (`megaent.model.policy.Policy`, TP-sharded like the
  trainer) reads the training GPTModel's own parameter storage wherever the layouts agree (`bind_inference`);
  only the fused QKV, which megatron-core lays out per query group, is copied after each update (`sync`).
  Each DP replica samples its share of the prompts, all TP ranks of a replica in lockstep; the shares are
  all-gathered over DP.
- embedded, PP > 1: a stage holds only some layers, so every rank keeps a full inference copy (TP = 1, a world
  of one) reloaded from `rollout_weights/` after each update (fine for the CPU demo; GPU runs use SGLang).
- http / sglang: rank 0 talks to the servers (`megaent serve` or SGLang) and broadcasts the samples; weights go
  to the servers per rollout.weight_sync: "disk" = `save_hf` to `rollout_weights/` + `/update_weights_from_disk`;
  "distributed" (alias "nccl") = SGLang's process-group route (`megaent.rollout.weight_sync.DistWeightSync`:
  bucket by bucket, TP/PP-gathered per tensor, broadcast by rank 0 over NCCL on GPUs or gloo on CPU, no file).
  rollout.colocate: the servers free their memory before the update (`release`) and get it back around the
  sync (SGLang's /release_memory_occupation, /resume_memory_occupation; megaent.rollout.memory_api).
Every rank returns the same `list[list[Sample]]`, so the later phases are SPMD without further messages.

Sampling seeds are derived from (trainer.seed, step, round, replica), so a resumed run draws the same samples.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megaent.config import RolloutConfig
from megaent.parallel import ParallelState, singleton_state
from megaent.rollout.types import Sample, SamplingParams
from megaent.trainer.components import derive_seed

log = logging.getLogger(__name__)


def bind_inference(decoder: Any, policy: Any) -> list[str]:
    """Point the decoder's parameters at the training policy's storage wherever the layouts agree; returns the
    names that must be copied instead (`sync_inference`). Call after megatron-core DDP has placed the
    parameters in its buffers. No collectives."""
    params = dict(decoder.named_parameters())
    copied = []
    with torch.no_grad():
        for name, t in policy.megaent_params().items():
            p = params[name]
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                raise ValueError(f"{name}: training shard {tuple(t.shape)} {t.dtype} vs decoder "
                                 f"{tuple(p.shape)} {p.dtype}")
            if any(t.data_ptr() == q.data_ptr() for q in policy.parameters()):
                p.data = t.data  # the same storage: optimizer steps are seen without a copy
            else:
                p.copy_(t)
                copied.append(name)
    return copied


def sync_inference(decoder: Any, policy: Any, copied: Sequence[str]) -> None:
    """After an optimizer step: copy the non-shared parameters, bump every version (the decode runner's caches
    of packed weights are stamped with it). No collectives."""
    from torch.autograd.graph import increment_version

    params = dict(decoder.named_parameters())
    view = policy.megaent_params() if copied else {}
    with torch.no_grad():
        for name in copied:
            params[name].copy_(view[name])
    for p in decoder.parameters():
        increment_version(p)


class RolloutPhase:
    """Generates samples for a list of prompts on all ranks; `sync()` pushes new weights after an update."""

    def __init__(self, cfg: RolloutConfig, *, policy: Any, state: ParallelState, hf_dir: str, run_dir: Path,
                 eos_token_ids: Sequence[int], seed: int) -> None:
        self.cfg, self.policy, self.state, self.seed = cfg, policy, state, seed
        self.eos = [int(t) for t in eos_token_ids]
        self.weights_dir = run_dir / "rollout_weights"
        self.client: Any = None
        self.sender: Any = None  # rank 0's DistWeightSync (rollout.weight_sync=distributed), made at the first sync
        self.engine: Any = None
        self.decoder: Any = None
        self._copied: list[str] = []
        self.servers: Any = None
        self.version = 0  # the step whose weights the engine samples from (set by sync; 0 = the initial ones)
        if cfg.engine == "embedded":
            from megaent.rollout.embedded import EmbeddedEngine

            if state.pp == 1:
                from megaent.model import load_hf

                self.decoder = load_hf(hf_dir, state, dtype=policy.dtype)
                self._copied = bind_inference(self.decoder, policy)
                self.engine = EmbeddedEngine(self.decoder, state, eos_token_ids=self.eos, seed=seed,
                                             record_tapes=False)
            else:
                self._solo = singleton_state(state)
                from megaent.model import load_hf

                self.engine = EmbeddedEngine(load_hf(hf_dir, self._solo, dtype=policy.dtype), self._solo,
                                             eos_token_ids=self.eos, seed=seed)
        elif state.rank == 0:
            from megaent.rollout.client import SGLangClient

            urls = list(cfg.urls)
            if cfg.engine == "sglang":
                from megaent.rollout.launcher import launch_sglang

                self.servers = launch_sglang(hf_dir, n_servers=1, tp=cfg.sglang_tp,
                                             mem_fraction=cfg.sglang_mem_fraction)
                urls = list(self.servers.urls)
            self.client = SGLangClient(urls, timeout_s=cfg.request_timeout_s)

    @property
    def shares_policy(self) -> bool:
        return self.cfg.engine == "embedded" and self.state.pp == 1

    def params(self, *, seed: int) -> SamplingParams:
        c = self.cfg
        return SamplingParams(n=c.n_samples, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                              top_p=c.top_p, top_k=c.top_k, stop_token_ids=() if c.ignore_eos else tuple(self.eos),
                              ignore_eos=c.ignore_eos, seed=seed)

    def generate(self, prompts: list[list[int]], *, step: int, round_: int = 0) -> list[list[Sample]]:
        """Collective: samples[i][j] = j-th sample of prompt i, identical on every rank."""
        st = self.state
        if self.cfg.engine != "embedded":
            out: list[Any] = [None]
            if st.rank == 0:
                out[0] = self.generate_here(prompts, step=step, round_=round_)
            if st.world_size > 1:
                dist.broadcast_object_list(out, src=0)
            return out[0]
        # Embedded: each DP replica samples a contiguous share; its seed names (step, round, share) so the
        # result does not depend on which rank computed it.
        bounds = [len(prompts) * d // st.dp for d in range(st.dp + 1)]
        mine = prompts[bounds[st.dp_rank]:bounds[st.dp_rank + 1]]
        local = self.engine.generate(mine, self.params(seed=derive_seed(self.seed, step, round_, st.dp_rank))) if mine \
            else []
        if st.dp == 1:
            return local
        shares: list[Any] = [None] * st.dp
        dist.all_gather_object(shares, local, group=st.dp_group)
        return [s for share in shares for s in share]

    def release(self) -> None:
        """rollout.colocate: rank 0 asks every server to free its weights and KV cache before the update."""
        if self.cfg.colocate and self.client is not None:
            self.client.release_memory()

    def generate_here(self, prompts: list[list[int]], *, step: int, round_: int = 0) -> list[list[Sample]]:
        """Rank 0, servers only: `generate`'s samples without its broadcast (the async producer thread)."""
        assert self.client is not None, "generate_here runs on rank 0 with rollout servers"
        return self.client.generate(prompts, self.params(seed=derive_seed(self.seed, step, round_)))

    def sync(self, *, step: int) -> str:
        """Collective: make the engine sample from the updated policy; returns the route taken. Colocated
        servers get their weights' memory back first and their KV cache after (SGLang's order; a server that
        released nothing takes both as no-ops)."""
        self.version = step
        if self.shares_policy:
            sync_inference(self.decoder, self.policy, self._copied)
            return "shared"
        colocated = self.cfg.colocate and self.client is not None
        if colocated:
            self.client.resume_memory(["weights"])
        try:
            return self._push(step)
        finally:
            if colocated:
                self.client.resume_memory(["kv_cache"])

    def _push(self, step: int) -> str:
        if self.engine is None and self.cfg.weight_sync in ("distributed", "nccl"):
            return self._sync_distributed(step)
        from megaent.model import save_hf

        out = save_hf(self.policy, self.state, self.weights_dir)
        if dist.is_initialized() and self.state.world_size > 1:
            dist.barrier()
        if self.engine is not None:
            self.engine.load_weights(out)
            return "disk-copy"
        if self.state.rank == 0:
            self.client.update_weights_from_disk(str(Path(out).resolve()), weight_version=str(step))
        return "disk"

    def _sync_distributed(self, step: int) -> str:
        """Collective: the HF tensors over the weight-update group (rank 0 joins it with the servers first)."""
        from megaent.rollout.weight_sync import DistWeightSync, backend_for, sync_weights_distributed

        if self.state.rank == 0 and self.sender is None:
            from megaent.parallel.launch import free_port

            # Servers reach the TCP store on rank 0's host: the launcher's master address names it.
            self.sender = DistWeightSync(self.client, backend=backend_for(self.state.device),
                                         master_address=getattr(self.state.launch, "master_addr", "127.0.0.1"),
                                         master_port=free_port(),
                                         timeout_s=self.cfg.request_timeout_s)
        sync_weights_distributed(self.policy, self.state, self.sender, weight_version=str(step))
        return "distributed"

    def close(self) -> None:
        try:
            if self.sender is not None:
                self.sender.close()
        finally:
            if self.servers is not None:
                self.servers.stop()
