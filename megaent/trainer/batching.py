"""Token-balanced, padding-free micro-batches and the rank-0 scatter of a rollout batch.

A `TrainSample` is one prompt + response with its RL data. `make_micro_batches`
packs samples into micro-batches of at most `max_tokens` tokens; each
micro-batch is ONE row `[1, S]` holding several samples back to back, with
`segment_ids` (attention stays inside a sample) and position ids that restart
at 0 for every sample, so no padding token is ever computed. Per-token RL
tensors (targets, mask, advantages, old/ref log-probs, token uids) are laid out
on the same row, aligned with the position that PREDICTS the token: position
`i` of a sample carries target `tokens[i + 1]`, and the mask is 1 where that
target is a response token.

Prefix sharing (default): the G samples of a GRPO group share their prompt, so
the prompt is forwarded (and back-propagated) once per micro-batch: one prefix
segment prompt[:p-1], then per sample only tokens[p-1:L-1], which attend to
the prefix and causally to themselves (`MicroBatch.prefix_ids`,
`megaent.model.layers.SegmentLayout`). Exactly the same log-probs and
gradients, (G - 1)(p - 1) + G fewer tokens per group (the last token of a
sample has no target and no reader). A whole group stays in one micro-batch
when it fits the budget.

Layout independence: `token_uid = sample.uid * UID_STRIDE + i` names each token
of the whole rollout batch, whatever micro-batch or rank it lands on, so random
choices keyed by it (Clip-Cov) do not depend on the split.

Collectives: `equalize_micro_batches` all-reduces one int (MAX) over the DP
group; `scatter_samples` all-gathers one int per rank and scatters pickled
samples (scatter_object_list over the world group) from `src`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

UID_STRIDE = 1 << 24  # > any sequence length; uid * stride + position is unique per token
HOST = torch.device("cpu")  # where rows are packed; `MicroBatch.to` moves them to the policy's device once


@dataclass
class TrainSample:
    """One sample of a rollout batch, ready for training.

    tokens: [L] int64, prompt followed by response. advantage: a float (GRPO:
    one per sample) or a [L - prompt_len] fp32 tensor. old_logprobs /
    ref_logprobs: [L - prompt_len] fp32 log-probs of the response tokens (None
    = not known yet, e.g. before `compute_logprobs`). group: GRPO group (prompt)
    id, kept whole on one DP rank; uid: unique id of the sample in the rollout.
    """

    tokens: torch.Tensor
    prompt_len: int
    advantage: Union[float, torch.Tensor] = 0.0
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    group: int = 0
    uid: int = 0

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def response_len(self) -> int:
        return len(self) - self.prompt_len


@dataclass
class MicroBatch:
    """Samples packed into one row; every tensor is [1, S] (S = row tokens, 1 for an empty micro-batch).

    input_ids/position_ids/segment_ids/targets/token_uid int64; mask, advantages,
    old_logprobs (zeros where unknown) and ref_logprobs fp32 (None when no
    sample has them). `uids[k]`, `lengths[k]` (its token count L) and
    `prompt_lens[k]` describe sample k; `offsets[k] + i` is the row index of its
    position i for every position in its own segment (all of 0..L-1 unshared;
    prompt_len-1..L-2 shared), so its response values sit at
    `offsets[k] + prompt_len - 1 ... offsets[k] + L - 2` either way.

    Prefix sharing (`pack(share_prefix=True)`): the samples of one GRPO group
    with identical prompts keep ONE copy of prompt[:p-1] (a prefix segment,
    mask 0) followed by one segment per sample, tokens[p-1:L-1] (the last token
    has no target and no reader, so it is dropped). `prefix_ids` [1, S] int64 is,
    on a sample segment's tokens, the segment id of the prefix segment it also
    attends to (all of it), -1 elsewhere; None when nothing is shared.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    token_uid: torch.Tensor
    ref_logprobs: Optional[torch.Tensor] = None
    prefix_ids: Optional[torch.Tensor] = None
    """[1, S] int64 segment id of the prefix each sample-segment token attends to, -1 elsewhere (None: no sharing)."""
    logprobs: Optional[torch.Tensor] = None
    """Current-policy log-probs [1, S] fp32, filled by `megaent.trainer.update.compute_logprobs`."""
    entropy: Optional[torch.Tensor] = None
    """Current-policy entropy [1, S] fp32, filled by `compute_logprobs`."""
    uids: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens computed for this micro-batch (the row length; 0 when empty)."""
        return 0 if self.is_empty else int(self.input_ids.shape[-1])

    @property
    def is_empty(self) -> bool:
        return not self.uids

    def to(self, device: torch.device) -> "MicroBatch":
        """A copy with every tensor on `device` (the device rule: the model's inputs live on its device)."""
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return MicroBatch(**moved)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """[n_seg + 1] int32 segment boundaries of the row (THD layout), on the row's device."""
        seg = self.segment_ids.reshape(-1)
        starts = torch.nonzero(seg[1:] != seg[:-1]).reshape(-1) + 1
        ends = torch.tensor([seg.numel()], device=seg.device)
        zero = torch.zeros(1, dtype=starts.dtype, device=seg.device)
        return torch.cat([zero, starts, ends]).to(torch.int32)

    def packed_seq_params(self) -> Any:
        """megatron-core `PackedSeqParams` (THD): each segment attends causally to itself only.

        Needs a row without prefix sharing (`pack(share_prefix=False)`). One host sync (the longest segment)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        if self.prefix_ids is not None:
            raise ValueError("a prefix-shared micro-batch has no THD layout; pack it with share_prefix=False")
        cu = self.cu_seqlens
        longest = int((cu[1:] - cu[:-1]).max())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                               max_seqlen_kv=longest)


def share_units(samples: Sequence[TrainSample]) -> list[list[int]]:
    """Indices of `samples` grouped into prefix-sharing units, in order of first appearance.

    A unit of >= 2 samples has the same `group`, the same prompt_len p >= 2 and
    identical prompt tokens (compared, never assumed); every other sample is a
    unit of its own. No collectives.
    """
    units: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        p = s.prompt_len
        key = (s.group, tuple(s.tokens[:p].tolist())) if p >= 2 else ("alone", i)
        units.setdefault(key, []).append(i)
    return list(units.values())


def unit_tokens(samples: Sequence[TrainSample]) -> int:
    """Row tokens of one unit: L for a lone sample, (p - 1) + sum of response lengths for a shared group."""
    if len(samples) == 1:
        return len(samples[0])
    return samples[0].prompt_len - 1 + sum(s.response_len for s in samples)


def pack(samples: Sequence[TrainSample], *, share_prefix: bool = True, multiple: int = 1) -> MicroBatch:
    """Pack `samples` into one row; an empty list gives a `multiple`-token micro-batch with mask 0.

    multiple: the row is padded to a multiple of it (TP with sequence parallelism splits the row over the TP
    ranks) by one last segment of token 0 with mask 0.

    share_prefix: samples of one `share_units` unit share one prefix segment
    (see `MicroBatch`); a lone sample keeps the full layout (positions 0..L-1,
    its last token included). False: every sample is laid out whole, in the
    given order (the layout without sharing, the reference of the tests).
    """
    if not samples:
        z = torch.zeros(1, max(1, multiple), dtype=torch.long)
        f = torch.zeros(1, max(1, multiple), dtype=torch.float32)
        return MicroBatch(input_ids=z, position_ids=z.clone(), segment_ids=z.clone(), targets=z.clone(), mask=f,
                          advantages=f.clone(), old_logprobs=f.clone(), token_uid=z.clone())
    for s in samples:
        if not 1 <= s.prompt_len < len(s):
            raise ValueError(f"sample uid={s.uid}: prompt_len={s.prompt_len} with {len(s)} tokens; need "
                             f"1 <= prompt_len < len(tokens)")
    has_ref = any(s.ref_logprobs is not None for s in samples)
    units = share_units(samples) if share_prefix else [[i] for i in range(len(samples))]
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "pos", "seg", "tgt", "mask", "adv", "old", "ref",
                                                           "uid", "pre")}
    uids, offsets, lengths, prompt_lens = [], [], [], []
    row, seg = 0, 0

    def emit(full: dict[str, torch.Tensor], a: int, b: int, prefix: int) -> None:
        nonlocal row, seg
        for k, v in full.items():
            cols[k].append(v[a:b])
        cols["seg"].append(torch.full((b - a,), seg, dtype=torch.long, device=HOST))
        cols["pre"].append(torch.full((b - a,), prefix, dtype=torch.long, device=HOST))
        row, seg = row + b - a, seg + 1

    for unit in units:
        shared = len(unit) > 1
        p = samples[unit[0]].prompt_len
        prefix = -1
        if shared:  # prompt[:p-1] once, token uids of the unit's first sample
            prefix = seg
            head = _columns(samples[unit[0]])
            head["tgt"] = torch.zeros_like(head["tgt"])  # no targets on the prefix (mask 0 there anyway)
            emit(head, 0, p - 1, -1)
        for i in unit:
            s = samples[i]
            a, b = (p - 1, len(s) - 1) if shared else (0, len(s))
            uids.append(s.uid)
            offsets.append(row - a)
            lengths.append(len(s))
            prompt_lens.append(s.prompt_len)
            emit(_columns(s), a, b, prefix)
    pad = (-row) % max(1, multiple)
    if pad:
        zeros = {k: torch.zeros(pad, dtype=torch.long if k in ("ids", "pos", "tgt", "uid") else torch.float32,
                                device=HOST)
                 for k in ("ids", "pos", "tgt", "mask", "adv", "old", "ref", "uid")}
        emit(zeros, 0, pad, -1)
    r = {k: torch.cat(v)[None] for k, v in cols.items()}
    return MicroBatch(input_ids=r["ids"], position_ids=r["pos"], segment_ids=r["seg"], targets=r["tgt"],
                      mask=r["mask"], advantages=r["adv"], old_logprobs=r["old"], token_uid=r["uid"],
                      ref_logprobs=r["ref"] if has_ref else None,
                      prefix_ids=r["pre"] if bool((r["pre"] >= 0).any()) else None, uids=uids, offsets=offsets,
                      lengths=lengths, prompt_lens=prompt_lens)


def _columns(s: TrainSample) -> dict[str, torch.Tensor]:
    """Per-position columns [L] of one whole sample: position i predicts tokens[i + 1]."""
    n, p = len(s), s.prompt_len
    resp = slice(p - 1, n - 1)  # positions whose target is a response token
    tokens = s.tokens.to(torch.long)
    tgt = torch.zeros(n, dtype=torch.long, device=HOST)
    tgt[:-1] = tokens[1:]
    mask = torch.zeros(n, device=HOST)
    mask[resp] = 1.0
    return {"ids": tokens, "pos": torch.arange(n, device=HOST), "tgt": tgt, "mask": mask, "adv": _place(s.advantage, n, resp),
            "old": _place(s.old_logprobs, n, resp), "ref": _place(s.ref_logprobs, n, resp),
            "uid": s.uid * UID_STRIDE + torch.arange(n, device=HOST)}


def _place(values: Union[None, float, torch.Tensor], n: int, resp: slice) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.float32, device=HOST)
    if values is None:
        return out
    if isinstance(values, torch.Tensor) and values.dim() > 0:
        want = resp.stop - resp.start
        if values.numel() != want:
            raise ValueError(f"per-token values have {values.numel()} entries; the response has {want} tokens")
    out[resp] = torch.as_tensor(values, dtype=torch.float32, device=HOST)
    return out


def unpack_response(values: torch.Tensor, mb: MicroBatch) -> dict[int, torch.Tensor]:
    """Per-sample response values from a packed row: values [1, S] -> {uid: [L - prompt_len]}."""
    row = values.reshape(-1)
    return {uid: row[off + p - 1: off + n - 1] for uid, off, n, p in zip(mb.uids, mb.offsets, mb.lengths,
                                                                          mb.prompt_lens)}


def split_token_balanced(lengths: Sequence[int], *, max_tokens: int) -> list[list[int]]:
    """Indices of samples per micro-batch: as few micro-batches as first-fit-decreasing needs, tokens balanced.

    First-fit-decreasing fixes the count k; longest-first onto the lightest of k
    bins then evens out the tokens, kept when it respects the budget. A sample
    longer than `max_tokens` gets a micro-batch of its own (over budget, never
    truncated). Indices inside a micro-batch are sorted.
    """
    if max_tokens < 1:
        raise ValueError(f"trainer.max_tokens_per_micro_batch={max_tokens}: must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    ffd: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                ffd[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            ffd.append([i])
            loads.append(lengths[i])
    k = len(ffd)
    lpt: list[list[int]] = [[] for _ in range(k)]
    lpt_loads = [0] * k
    for i in order:
        b = min(range(k), key=lambda j: (lpt_loads[j], j))
        lpt[b].append(i)
        lpt_loads[b] += lengths[i]
    ok = all(load <= max_tokens or len(bin_) == 1 for bin_, load in zip(lpt, lpt_loads))
    bins = lpt if ok else ffd
    return [sorted(b) for b in bins if b]


def make_micro_batches(samples: Sequence[TrainSample], *, max_tokens: int, dp_group: Optional[dist.ProcessGroup] = None,
                       share_prefix: bool = True, multiple: int = 1, device: Optional[torch.device] = None
                       ) -> list[MicroBatch]:
    """Token-balanced packed micro-batches; with `dp_group`, padded with empty ones to the DP-wide maximum count.

    share_prefix: each `share_units` unit (a GRPO group with one prompt) is
    packed with its prompt once (`pack`) and kept in one micro-batch when its
    row tokens (`unit_tokens`) fit `max_tokens`; a larger group is split into
    balanced pieces, each with its own copy of the prefix. False: samples are
    balanced one by one (the layout without sharing).
    Equal counts keep per-micro-batch collectives of the loss lined up across
    DP ranks. multiple: each row padded to a multiple of it (`pack`). 1 all-reduce (MAX) on dp_group when
    given, on `device`. The micro-batches are built on the host; `MicroBatch.to` moves them.
    """
    units = share_units(samples) if share_prefix else [[i] for i in range(len(samples))]
    pieces = [piece for unit in units for piece in _split_unit(samples, unit, max_tokens=max_tokens)]
    costs = [unit_tokens([samples[i] for i in piece]) for piece in pieces]
    bins = split_token_balanced(costs, max_tokens=max_tokens)
    mbs = [pack([samples[i] for j in b for i in pieces[j]], share_prefix=share_prefix, multiple=multiple)
           for b in bins]
    return equalize_micro_batches(mbs, dp_group=dp_group, multiple=multiple, device=device)


def _split_unit(samples: Sequence[TrainSample], unit: list[int], *, max_tokens: int) -> list[list[int]]:
    """A unit over the budget -> balanced pieces whose row tokens fit (each repeats the p - 1 prefix tokens)."""
    if len(unit) == 1 or unit_tokens([samples[i] for i in unit]) <= max_tokens:
        return [unit]
    room = max(1, max_tokens - samples[unit[0]].prompt_len)  # so a one-sample piece (L tokens, unshared) fits too
    bins = split_token_balanced([samples[i].response_len for i in unit], max_tokens=room)
    return [[unit[j] for j in b] for b in bins]


def equalize_micro_batches(mbs: list[MicroBatch], *, dp_group: Optional[dist.ProcessGroup], multiple: int = 1,
                           device: Optional[torch.device] = None) -> list[MicroBatch]:
    """Append empty micro-batches up to the largest count on `dp_group` (at least 1 micro-batch everywhere).

    1 all-reduce (MAX) of one int on dp_group, on `device` (the group's device: the policy's under NCCL)."""
    count = torch.tensor([max(1, len(mbs))], dtype=torch.long, device=device)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=dp_group)
    return list(mbs) + [pack([], multiple=multiple) for _ in range(int(count.item()) - len(mbs))]


def partition_groups(samples: Sequence[TrainSample], parts: int) -> list[list[TrainSample]]:
    """Split samples into `parts` lists, GRPO groups whole, total tokens balanced (longest group first)."""
    groups: dict[int, list[TrainSample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    order = sorted(groups, key=lambda g: (-sum(len(s) for s in groups[g]), g))
    out: list[list[TrainSample]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for g in order:
        b = min(range(parts), key=lambda j: (loads[j], j))
        out[b].extend(groups[g])
        loads[b] += sum(len(s) for s in groups[g])
    return [sorted(part, key=lambda s: s.uid) for part in out]


def scatter_samples(samples: Optional[Sequence[TrainSample]], *, dp_rank: int, dp: int, src: int = 0
                    ) -> list[TrainSample]:
    """Send each DP rank its share of a rollout batch held on global rank `src` (None elsewhere).

    Groups stay whole and tokens are balanced (`partition_groups`); every TP
    and PP rank of a DP replica receives the same share. Collectives on the
    world group: 1 all-gather of the DP ranks, 1 scatter_object_list.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(samples or [])
    world = dist.get_world_size()
    dp_ranks = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(dp_ranks, torch.tensor([dp_rank], dtype=torch.long))
    inputs = None
    if dist.get_rank() == src:
        if samples is None:
            raise ValueError(f"scatter_samples: rank {src} is the source and must pass the rollout samples")
        parts = partition_groups(samples, dp)
        inputs = [parts[int(r.item())] for r in dp_ranks]
    out: list = [None]
    dist.scatter_object_list(out, inputs, src=src)
    return out[0]
