"""`megaent convert SRC DST`: HuggingFace <-> megaent checkpoints, through any TP x PP layout.

SRC is a HF directory (has config.json) or a megaent checkpoint (a run's `checkpoints/step_N`, has meta.json
and COMPLETE). The default direction is the other format; `--to hf` also makes HF -> HF (a round trip through
the layout, e.g. to re-shard the safetensors or check a layout). Run under torchrun with TP*PP processes for a
sharded layout, or in one process (TP = PP = 1). A megaent checkpoint written here holds the model only (no
optimizer), in the same canonical DTensor form the trainer writes, so `trainer` runs can start from it.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def is_megaent_checkpoint(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "COMPLETE").is_file()


def convert(src: str, dst: str, *, tp: int = 1, pp: int = 1, to: Optional[str] = None) -> Path:
    from megaent.parallel import destroy_parallel, init_parallel

    src_p, dst_p = Path(src), Path(dst)
    if is_megaent_checkpoint(src_p):
        kind = "megaent"
    elif (src_p / "config.json").is_file():
        kind = "hf"
    else:
        raise FileNotFoundError(f"convert: {src} is neither a HF directory (config.json) nor a megaent checkpoint "
                                "(meta.json + COMPLETE, e.g. runs/NAME/checkpoints/step_000010)")
    to = to or ("megaent" if kind == "hf" else "hf")
    state = init_parallel(tp, pp)
    try:
        policy = _load(src_p, kind, state)
        if to == "hf":
            from megaent.model import save_hf

            save_hf(policy, state, dst_p)
        else:
            _save_megaent(policy, state, dst_p)
        if state.rank == 0:
            log.info("converted %s (%s) -> %s (%s) through TP=%d PP=%d", src, kind, dst, to, tp, pp)
        return dst_p
    finally:
        destroy_parallel()


def _engine(hf_dir: Path) -> str:
    """The decoder that holds the model while converting: megatron-core's for MoE (the training layout, EP included;
    the own decoder holds MoE too since its SparseMoE, but converts stay on the engine that trains them)."""
    from megaent.model.arch import ModelArch

    return "mcore" if ModelArch.from_hf_dir(hf_dir).num_experts else "own"


def _load(src: Path, kind: str, state):  # -> Policy or GPTPolicy
    from megaent.model import load_hf

    if kind == "hf":
        return load_hf(str(src), state, engine=_engine(src))
    from megaent.trainer.checkpoint import load_checkpoint, read_meta

    base = Path(read_meta(src)["hf_dir"])
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"convert: checkpoint {src} was trained from {base}, which is gone; its "
                                "config.json and tokenizer are needed to rebuild the model")

    from megaent.trainer.state_dict import canonical_state

    # architecture + tokenizer source; weights are replaced below
    policy = load_hf(str(base), state, engine=_engine(base))
    tensors = canonical_state(policy, None, state, loading=True)
    load_checkpoint(src, tensors, rank=state.rank, restore_rng=False)  # digests checked, no unpickling
    return policy


def _save_megaent(policy, state, dst: Path) -> None:
    from megaent.trainer.checkpoint import save_checkpoint
    from megaent.trainer.state_dict import canonical_state

    tensors = canonical_state(policy, None, state, loading=False)
    # save_checkpoint writes <run>/checkpoints/step_N; a standalone conversion names DST itself.
    run = dst.parent / f".{dst.name}.run"
    path = save_checkpoint(run, 0, tensors, {"hf_dir": policy.source_dir, "optimizer_steps": 0,
                                             "layout": {"tp": state.tp, "pp": state.pp, "dp": state.dp}},
                           rank=state.rank, keep_last=1)
    if state.rank == 0:
        if dst.exists():
            shutil.rmtree(dst)
        path.rename(dst)
        shutil.rmtree(run, ignore_errors=True)
