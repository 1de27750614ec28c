"""Entry points behind `megaent train`: build the parallel state and run directory, run, tear down.

Run directory: `trainer.run_dir`, or `runs/<config name>-<YYYYmmdd-HHMMSS>` chosen by rank 0 and broadcast.
A run directory that already holds a complete checkpoint is resumed automatically (what a requeued Slurm job
relies on); `megaent train --resume RUN_DIR` does the same from the run's own `config.yaml`.
Exit codes: 0 done, 2 user error (bad config, missing file, unwritable run dir), 3 stopped by a signal after
checkpointing (requeue me).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from megaent.config import Config, ConfigError, load_config, to_yaml

log = logging.getLogger(__name__)


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
        (run_dir / "config.yaml").write_text(to_yaml(cfg))


def preflight(cfg: Config) -> None:
    """Cheap checks of paths before any process group or model exists, so a typo costs one line, exit 2."""
    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r}: no config.json there; point it at a HuggingFace "
                          "checkpoint directory (or leave it empty for the demo's own tiny policy)")
    if cfg.data.path and not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path={cfg.data.path!r}: file not found; give a .jsonl or .parquet prompt file "
                          "(or leave it empty for the synthetic demo task)")
    target = Path(cfg.trainer.run_dir) if cfg.trainer.run_dir else Path("runs")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK) or (probe.exists() and not probe.is_dir()):
        raise ConfigError(f"trainer.run_dir={str(target)!r}: {probe} is not a writable directory; choose a "
                          "writable trainer.run_dir")
    from megaent.trainer.components import check_backend

    check_backend(cfg.model)


def train(cfg: Config, *, config_path: Optional[str] = None) -> int:
    """Run (or continue) training for `cfg`; collective over all launched ranks."""
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.trainer import Trainer

    preflight(cfg)
    if cfg.trainer.threads > 0:
        import torch

        torch.set_num_threads(cfg.trainer.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megaent.trainer.signals import StopFlag

    stop = StopFlag().install()  # before anything slow: a USR1 during start-up still checkpoints cleanly
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp, backend=cfg.parallel.backend,
                          timeout_s=cfg.parallel.timeout_s)
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
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        stop.uninstall()
        destroy_parallel()


def resume(run_dir: str, *, overrides: Sequence[str] = ()) -> int:
    """`megaent train --resume RUN_DIR [key=value ...]`: the run's own config (+ overrides), same run dir."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; pass a run directory written by megaent train")
    cfg = load_config(path, list(overrides) + [f"trainer.run_dir={run_dir}"])
    return train(cfg, config_path=str(path))
