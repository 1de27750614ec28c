"""Load a HF Qwen2/Llama checkpoint into any TP x PP layout, and export back to HF.

`load_hf`: every rank opens the safetensors files (`model.safetensors` or the
shards listed in `model.safetensors.index.json`) and reads only the slices of
its stage and TP shard through `safe_open(...).get_slice`; no rank ever
materialises the full model. No collectives.

`save_hf`: collective over all ranks (call it on every rank). Only the DP-rank-0
replica takes part; for one parameter at a time, the TP shards are gathered to
TP rank 0 of the owning stage (`gather` on tp_group), merged into HF tensors
(padding removed) and sent point-to-point to global rank 0, which writes
safetensors files of at most `max_shard_bytes` (with an index when there are
several), `config.json`, and the tokenizer files of the source checkpoint,
into a temporary directory that is renamed into place at the end. Ends with a
barrier on the default group. With expert parallelism an expert's weights come
from the EP rank that holds it (its expert-data-parallel rank 0) instead of DP
rank 0 (one all_gather_object of the rank coordinates first).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaent.model.arch import ModelArch
from megaent.model.hf_names import (ParamSpec, Part, expert_range, is_expert_param, merge_tp, model_param_specs,
                                    tp_slice, unfuse_local)
from megaent.model.policy import Policy
from megaent.parallel import ParallelState

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _weight_map(hf_dir: Path) -> dict[str, str]:
    """HF tensor name -> safetensors file name."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors files (PyTorch .bin checkpoints are not "
                                f"supported; convert them with transformers' save_pretrained)")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out


def load_hf(hf_dir: str | Path, state: ParallelState, dtype: torch.dtype = torch.float32, *,
            pipeline_layers: Optional[list[int]] = None, vocab_multiple: int = 1,
            activation_checkpointing: bool = False, engine: str = "own", **gpt_options: Any) -> Any:
    """Build this rank's policy stage/shard from a HF checkpoint directory, reading only local slices.

    engine: "own" (megaent's decoder, `Policy`) or "mcore" (megatron-core GPTModel, `GPTPolicy`; `gpt_options`
    go to it: backend, sequence_parallel, recompute)."""
    hf_dir = Path(hf_dir)
    arch = ModelArch.from_hf_dir(hf_dir)
    if engine == "mcore":
        from megaent.model.gpt_policy import GPTPolicy

        policy = GPTPolicy(arch, state, dtype=dtype, pipeline_layers=pipeline_layers, vocab_multiple=vocab_multiple,
                           recompute=gpt_options.pop("recompute", "full" if activation_checkpointing else "none"),
                           **gpt_options)
    elif engine == "own":
        policy = Policy(arch, state, dtype=dtype, pipeline_layers=pipeline_layers, vocab_multiple=vocab_multiple,
                        activation_checkpointing=activation_checkpointing)
    else:
        raise ValueError(f"engine={engine!r}: choose 'own' or 'mcore'")
    policy.source_dir = str(hf_dir)
    wmap = _weight_map(hf_dir)
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def read(part: Part) -> torch.Tensor:
            fname = wmap.get(part.hf_name)
            if fname is None:
                raise KeyError(f"{hf_dir}: tensor {part.hf_name!r} not found in the safetensors files "
                               f"(tie_word_embeddings={arch.tie_word_embeddings} in config.json)")
            if fname not in handles:
                handles[fname] = stack.enter_context(safe_open(str(hf_dir / fname), framework="pt"))
            sl = handles[fname].get_slice(part.hf_name)
            shape = tuple(sl.get_shape())
            if shape != part.shape:
                raise ValueError(f"{hf_dir / fname}: {part.hf_name} has shape {shape}, config.json implies "
                                 f"{part.shape}")
            return tp_slice(sl, shape, part.kind, state.tp_rank, state.tp, padded_rows=policy.padded_vocab_size,
                            what=part.hf_name).to(dtype)

        policy.fill_(read)
    return policy


def _export_plan(policy: Policy) -> list[list[ParamSpec]]:
    """Per stage, the parameters to export (the tied head copy of the last stage is skipped)."""
    plan = model_param_specs(policy.arch, pp=policy.state.pp, pipeline_layers=policy.pipeline_layers)
    if policy.arch.tie_word_embeddings:
        plan = [[s for s in stage if s.name != "head.weight"] for stage in plan]
    return plan


class _ShardWriter:
    """Rank 0: accumulates tensors and flushes safetensors files of at most `max_bytes`."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and sum(x.numel() * x.element_size() for x in self.pending.values()) + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.total += nbytes

    def flush(self) -> None:
        if self.pending:
            path = self.out_dir / f"part-{len(self.files)}.safetensors"
            save_file(self.pending, str(path), metadata={"format": "pt"})
            self.files.append(list(self.pending))
            self.pending = {}

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.out_dir / "part-0.safetensors").rename(self.out_dir / "model.safetensors")
            return
        wmap = {}
        for i, names in enumerate(self.files):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"part-{i}.safetensors").rename(self.out_dir / fname)
            wmap.update({k: fname for k in names})
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(wmap.items()))}, indent=2))


def save_hf(policy: Policy, state: ParallelState, out_dir: str | Path, *, dtype: Optional[torch.dtype] = None,
            src_dir: Optional[str | Path] = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a HF checkpoint of the whole model to `out_dir` (rank 0 writes; every rank must call).

    dtype: dtype of the saved tensors (default: the policy's). src_dir: where tokenizer files are
    copied from (default: the directory `load_hf` read). Collectives: per parameter one `gather` on
    tp_group and one send/recv pair to rank 0 (DP rank 0 only); a final barrier on the default group.
    """
    out_dir = Path(out_dir)
    save_dtype = dtype or policy.dtype
    plan = _export_plan(policy)
    is_writer = state.rank == 0
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    writer = None
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = _ShardWriter(tmp, max_shard_bytes)
    ep = getattr(state, "ep", 1)
    coords = _rank_coords(state) if ep > 1 else None
    if state.dp_rank == 0 or (ep > 1 and state.edp_rank == 0):
        params = policy.megaent_params() if hasattr(policy, "megaent_params") else dict(policy.named_parameters())
        for stage, specs in enumerate(plan):
            for spec in specs:
                owner = _expert_owner(policy, spec, ep)
                mine = state.dp_rank == 0 if owner is None else state.edp_rank == 0 and state.ep_rank == owner
                if not mine and state.rank != 0:
                    continue
                full = _gather_param(policy, state, spec, params, stage) if mine else None
                src = state.pp_ranks[stage] if coords is None else coords[
                    (stage, 0, 0 if owner is None else owner, 0, owner is None)]
                for part in spec.parts:
                    t = _to_rank0(state, full, part, src, policy.dtype)
                    if writer is not None:
                        writer.add(part.hf_name, t.to("cpu", save_dtype))
    if writer is not None:
        writer.finish()
        cfg = policy.arch.to_hf_config(dtype=_DTYPE_NAMES.get(save_dtype, str(save_dtype).removeprefix("torch.")))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        src = src_dir or policy.source_dir
        if src is not None:
            for name in TOKENIZER_FILES:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, tmp / name)
        _replace_dir(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def _expert_owner(policy: Policy, spec: ParamSpec, ep: int) -> Optional[int]:
    """The EP rank holding the expert `spec` belongs to; None for a parameter every EP rank holds."""
    if ep == 1 or not is_expert_param(spec.name):
        return None
    e = int(spec.name.split(".moe.experts.")[1].split(".")[0])
    return next(r for r in range(ep) if e in expert_range(policy.arch, r, ep))


def _rank_coords(state: ParallelState) -> dict[tuple, int]:
    """(pp_rank, tp_rank, ep_rank, edp_rank, dense?) -> global rank of the exporting ranks: for dense parameters
    DP rank 0 (ep_rank/edp_rank keys 0), for experts expert-DP rank 0 of each EP rank. One all_gather_object."""
    rows: list = [None] * state.world_size
    dist.all_gather_object(rows, (state.rank, state.pp_rank, state.tp_rank, state.dp_rank, state.ep_rank,
                                  state.edp_rank))
    out: dict[tuple, int] = {}
    for rank, pp, tp, dp, ep, edp in rows:
        if dp == 0:
            out[(pp, tp, 0, 0, True)] = rank
        if edp == 0:
            out[(pp, tp, ep, 0, False)] = rank
    return out


def _gather_param(policy: Policy, state: ParallelState, spec: ParamSpec, params: dict, stage: int
                  ) -> Optional[dict[str, torch.Tensor]]:
    """On TP rank 0 of `stage`: {hf_name: merged full tensor}; None elsewhere. One gather on tp_group."""
    if state.pp_rank != stage:
        return None
    shard = params[spec.name].detach().contiguous()
    if state.tp == 1:
        shards = [shard]
    else:
        shards = [torch.empty_like(shard) for _ in range(state.tp)] if state.tp_rank == 0 else None
        dist.gather(shard, shards, group=state.tp_group, group_dst=0)
    if state.tp_rank != 0:
        return None
    per_rank = [unfuse_local(spec, s, state.tp, padded_rows=policy.padded_vocab_size) for s in shards]
    return {p.hf_name: merge_tp([pr[j] for pr in per_rank], p.kind, rows=p.shape[0])
            for j, p in enumerate(spec.parts)}


def _to_rank0(state: ParallelState, full: Optional[dict[str, torch.Tensor]], part: Part, src: int,
              dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Move one merged tensor from global rank `src` (TP rank 0 of its owners) to global rank 0 (send/recv;
    no-op when src is 0)."""
    if src == 0:
        return full[part.hf_name] if full is not None else None
    if full is not None and state.tp_rank == 0:
        dist.send(full[part.hf_name].contiguous(), dst=0)
        return None
    if state.rank == 0:
        buf = torch.empty(part.shape, dtype=dtype, device=state.device)
        dist.recv(buf, src=src)
        return buf
    return None


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, replacing an existing directory only after the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
