"""Entry points behind `megaent train`: build the parallel state and run directory, run, tear down.

Run directory: `trainer.run_dir`, or `runs/<config name>-<YYYYmmdd-HHMMSS>` chosen by rank 0 and broadcast.
A run directory that already holds a complete checkpoint is resumed automatically (what a requeued Slurm job
relies on); `megaent train --resume RUN_DIR` does the same from the run's own `config.yaml`, which must agree
with the copy the newest checkpoint carries (a damaged file is replaced by that copy, with a warning).
The run's `config.yaml` is written atomically at the start of a fresh run and after every checkpoint.

Exit codes: 0 done, 1 failed (e.g. a checkpoint could not be written or no checkpoint is intact), 2 user error
(bad config, missing file, unwritable run dir), 3 stopped by a signal after checkpointing (requeue me),
4 diverged (non-finite loss, gradients or weights; nothing saved from the bad step; do not requeue).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.distributed as dist

from megaent.config import Config, ConfigError, load_config, to_yaml
from megaent.config.load import unresolved
from megaent.trainer.atomic import write_text_atomic
from megaent.trainer.checkpoint import checkpoint_config, list_checkpoints
from megaent.trainer.integrity import CheckpointError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_REQUEUE = 0, 1, 3
REQUEUE_DIR_ENV = "MEGAENT_REQUEUE_DIR"
"""Set by `megaent.trainer.torchrun`: each local rank that checkpointed on a stop signal leaves a marker there."""


def _decide_run_dir(cfg: Config, config_path: Optional[str], rank: int, world: int) -> Path:
    choice = [cfg.trainer.run_dir]
    if not choice[0] and rank == 0:
        stem = Path(config_path).stem if config_path else "run"
        choice[0] = str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def _prepare_run_dir(run_dir: Path, cfg: Config, rank: int) -> None:
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"trainer.run_dir={str(run_dir)!r}: cannot write there ({exc.strerror}); "
                              "choose a writable directory") from None
        found = list_checkpoints(run_dir)
        if not found:  # a resumed run's file follows its checkpoints (save_checkpoint)
            write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        elif (found[-1][1] / "config.yaml").is_file():
            try:
                theirs = unresolved((found[-1][1] / "config.yaml").read_text(), source="checkpoint")
            except ConfigError:
                return  # resume checks it
            diff = [k for k in _differences(unresolved(to_yaml(cfg), source="config"), theirs)
                    if k != "trainer.run_dir"]
            if diff:
                log.warning("continuing %s with a config that differs from its checkpoint's at %s: the new "
                            "values apply from step %d on", run_dir, ", ".join(diff[:4]), found[-1][0] + 1)


def _world_size() -> int:
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    return int(env.get("SLURM_NTASKS", "1")) if "SLURM_PROCID" in env else 1


def _demo_arch() -> dict[str, Any]:
    """config.json fields of the demo's tiny policy (the warm-up's defaults), for layout checks before it exists."""
    import inspect

    from megaent.data.warmup import warmup_policy

    d = {k: v.default for k, v in inspect.signature(warmup_policy).parameters.items()}
    return {"num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"],
            "num_hidden_layers": d["layers"], "intermediate_size": 4 * d["hidden"]}


def check_layout(cfg: Config, *, world: int) -> None:
    """parallel.tp x parallel.pp must fit the launched world and the model's heads, MLP and layers."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp) != 0:
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp}: {world} launched process(es) are not a multiple "
                          f"of {tp * pp}; launch a multiple of tp*pp processes (torchrun --nproc-per-node) or "
                          "lower tp/pp")
    import json

    if cfg.model.path:
        try:
            arch = json.loads((Path(cfg.model.path) / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path={cfg.model.path!r}: config.json unreadable ({exc})") from None
    else:
        arch = _demo_arch()
    # megaent.model.arch.ModelArch.check_layout's rules, restated (see below): TP splits the query heads and the
    # MLP (the experts' for MoE); TP wider than the KV heads replicates each KV head over tp / kv ranks, which
    # split its head_dim rows (megatron-core's scheme for tp > num_query_groups)
    heads = arch.get("num_attention_heads", 1)
    kv = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or arch.get("hidden_size", heads) // heads
    moe = bool(arch.get("num_experts") or arch.get("num_local_experts"))
    ffn_key = "moe_intermediate_size" if moe and "moe_intermediate_size" in arch else "intermediate_size"  # Mixtral
    for name, n in {"num_attention_heads": heads, ffn_key: arch.get(ffn_key, tp)}.items():
        if n % tp:
            raise ConfigError(f"parallel.tp={tp}: does not divide the model's {name}={n}; choose a tp that "
                              "divides it")
    if kv % tp and (tp % kv or head_dim % (tp // kv)):
        raise ConfigError(f"parallel.tp={tp}: does not divide the model's num_key_value_heads={kv}, nor is it a "
                          f"multiple of it that splits head_dim={head_dim}; use a tp that divides {kv} or a "
                          f"multiple of {kv} dividing {kv * head_dim}")
    # megaent.model.arch.stage_layer_ranges' rule, restated: importing megaent.model pulls megatron-core in
    # (seconds, and its INFO lines) before a one-line usage error.
    layers, split = int(arch.get("num_hidden_layers", pp)), cfg.model.pipeline_layers
    if split is None and pp > layers:
        raise ConfigError(f"parallel.pp={pp}: exceeds the model's num_hidden_layers={layers}; use pp <= {layers}")
    if split is not None and sum(split) != layers:
        raise ConfigError(f"model.pipeline_layers={split}: must sum to the model's num_hidden_layers={layers}")
    check_experts(cfg.parallel.ep, dp=world // (tp * pp), experts=arch.get("num_experts") or
                  arch.get("num_local_experts") or 0)
    if moe and pp > 1 and arch.get("output_router_logits") and float(arch.get("router_aux_loss_coef") or 0) > 0:
        # megaent.trainer.update._RouterLoss: the routers of earlier stages are not on the last stage
        raise ConfigError(f"parallel.pp={pp}: config.json has output_router_logits=true (HF trains with the "
                          "load-balancing loss), which megaent adds only at parallel.pp=1; use parallel.pp=1 "
                          "(with parallel.ep / tp for memory) or set output_router_logits to false in config.json")


def check_experts(ep: int, *, dp: int, experts: int) -> None:
    """parallel.ep must divide the model's expert count and the data-parallel size (megatron-core carves the
    expert ranks out of DP)."""
    if ep == 1:
        return
    if not experts:
        raise ConfigError(f"parallel.ep={ep}: the model has no experts (not an MoE checkpoint); use parallel.ep=1")
    if experts % ep:
        raise ConfigError(f"parallel.ep={ep}: does not divide the model's {experts} experts; choose an ep that "
                          "divides it")
    if dp % ep:
        raise ConfigError(f"parallel.ep={ep}: does not divide the data-parallel size {dp} (world / (tp * pp)); "
                          "launch more processes or lower parallel.ep")


def _can_create_in(directory: Path) -> bool:
    """os.access says yes to root everywhere (/proc included); creating a directory tells the truth."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megaent-probe-", dir=directory))
    except OSError:
        return False
    return True


def preflight(cfg: Config) -> None:
    """Cheap checks of paths and layout before any process group or model exists: a typo costs one line, exit 2."""
    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r}: no config.json there; point it at a HuggingFace "
                          "checkpoint directory (or leave it empty for the demo's own tiny policy)")
    if cfg.data.path and not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path={cfg.data.path!r}: file not found; give a .jsonl or .parquet prompt file "
                          "(or leave it empty for the synthetic demo task)")
    from megaent.rewards.synthetic import TASKS

    if not cfg.data.path and cfg.data.task not in TASKS:
        raise ConfigError(f"data.task={cfg.data.task!r}: unknown synthetic task; choose one of {sorted(TASKS)} or "
                          "set data.path to a prompt file")
    target = Path(cfg.trainer.run_dir) if cfg.trainer.run_dir else Path("runs")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK) or (probe.exists() and not probe.is_dir()) or not _can_create_in(probe):
        raise ConfigError(f"trainer.run_dir={str(target)!r}: {probe} is not a writable directory; choose a "
                          "writable trainer.run_dir")
    check_layout(cfg, world=_world_size())
    from megaent.trainer.components import check_backend

    check_backend(cfg.model)


def _mark_requeue() -> None:
    """Under `megaent.trainer.torchrun`: tell the launcher this local rank checkpointed and wants a requeue."""
    where = os.environ.get(REQUEUE_DIR_ENV)
    if where:
        rank = os.environ.get("LOCAL_RANK", "0")
        (Path(where) / f"requeue-{rank}").write_text(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def train(cfg: Config, *, config_path: Optional[str] = None) -> int:
    """Run (or continue) training for `cfg`; collective over all launched ranks."""
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.signals import StopFlag

    stop = StopFlag().install()  # first: a USR1/TERM during start-up still checkpoints cleanly
    try:
        preflight(cfg)
        if cfg.trainer.threads > 0:
            import torch

            torch.set_num_threads(cfg.trainer.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from megaent.trainer.trainer import Trainer

        state = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, backend=cfg.parallel.backend,
                              timeout_s=cfg.parallel.timeout_s)
    except BaseException:
        stop.uninstall()
        raise
    trainer = None
    try:
        run_dir = _decide_run_dir(cfg, config_path, state.rank, state.world_size)
        cfg.trainer.run_dir = str(run_dir)
        ok = [True]
        try:
            _prepare_run_dir(run_dir, cfg, state.rank)
        except ConfigError:
            ok = [False]
            raise
        finally:
            if state.world_size > 1:
                dist.broadcast_object_list(ok, src=0)
            if not ok[0] and state.rank != 0:
                raise ConfigError(f"trainer.run_dir={str(run_dir)!r} is not writable (see rank 0)")
        if state.rank == 0:
            log.info("run directory %s", run_dir)
        trainer = Trainer(cfg, run_dir=run_dir, state=state, stop=stop)
        try:
            code = trainer.fit()
        except CheckpointError as exc:
            log.error("%s", exc)
            return EXIT_FAILED
        if code == EXIT_REQUEUE:
            _mark_requeue()
        return code
    finally:
        if trainer is not None:
            trainer.close()
        stop.uninstall()
        destroy_parallel()


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def resume_config(run_dir: str, *, overrides: Sequence[str] = ()) -> Config:
    """The config of `megaent train --resume RUN_DIR`: the run's own config.yaml, checked against the copy its
    newest checkpoint carries, plus `overrides`. A missing, empty or unparseable file is replaced by that copy
    (with a warning); a file that parses but differs from it is a ConfigError naming the keys."""
    path = Path(run_dir) / "config.yaml"
    copy = next((c for _, p in reversed(list_checkpoints(run_dir)) if (c := checkpoint_config(p))), None)
    try:
        mine = unresolved(path.read_text(), source=str(path)) if path.is_file() else None
        problem = None if mine is not None else f"{path} is missing"
    except ConfigError as exc:
        mine, problem = None, str(exc)
    source = path
    if copy is not None:
        theirs = unresolved(copy.read_text(), source=str(copy))
        if mine is None:
            log.warning("%s; resuming with the copy in %s", problem, copy)
            if _is_rank0():
                write_text_atomic(path, copy.read_text())
            source = copy
        else:
            diff = [k for k in _differences(mine, theirs) if k != "trainer.run_dir"]
            if diff:
                raise ConfigError(f"{path} differs from the config its checkpoint carries ({copy}) at "
                                  f"{', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}: change settings on "
                                  f"resume with overrides (megaent train --resume {run_dir} key=value), or restore "
                                  f"the file: cp {copy} {path}")
    elif mine is None:
        raise ConfigError(f"--resume {run_dir}: {problem}; pass a run directory written by megaent train")
    return load_config(source, list(overrides) + [f"trainer.run_dir={run_dir}"])


def resume(run_dir: str, *, overrides: Sequence[str] = ()) -> int:
    """`megaent train --resume RUN_DIR [key=value ...]`: the run's own config (+ overrides), same run dir."""
    cfg = resume_config(run_dir, overrides=overrides)
    return train(cfg, config_path=str(Path(run_dir) / "config.yaml"))
