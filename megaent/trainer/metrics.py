"""Metric sinks of a run: metrics.jsonl, TensorBoard, optional wandb, samples.jsonl, and the progress display.

Only the trainer writes metrics, and only on rank 0. `metrics.jsonl` holds one JSON object per step and is the
source of truth for `megaent fit-law` and `megaent plot`. Opening the sink at `start_step` (the resumed
checkpoint's step, 0 for a fresh start) first drops every row past it from metrics.jsonl and samples.jsonl, and
TensorBoard purges its events past it, so after any crash (a kill before the first checkpoint included) the
files continue without a gap or a repeat.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

from megaent.trainer.atomic import write_text_atomic

log = logging.getLogger(__name__)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a megaent run directory?")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not JSON ({exc.msg})") from None
    return rows


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep rows with step <= last_step (resume from a checkpoint taken after `last_step`)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        keep = []
        for ln in path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:  # a line cut by a kill -9 mid-write
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                keep.append(ln)
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))


class MetricsSink:
    """Rank-0 writer of per-step metrics to JSONL, TensorBoard and (optionally) wandb."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, start_step: int = 0, wandb_project: str = "",
                 run_name: str = "", config: Optional[dict[str, Any]] = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        truncate_metrics(self.run_dir, start_step)  # rows of steps that will run again
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._samples = open(self.run_dir / "samples.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a dependency; tolerate a broken install rather than lose the run
            log.warning("tensorboard not importable; metrics go to metrics.jsonl only")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.wandb_project is set but wandb is not installed: "
                                   "pip install 'megaent[wandb]' or set trainer.wandb_project=''") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        for s in samples:
            self._samples.write(json.dumps({"step": step, **s}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """A rich progress bar (step, reward, entropy, ETA) on rank 0; a log line per step in quiet mode."""

    def __init__(self, total: int, start: int, *, enabled: bool, quiet: bool) -> None:
        self.enabled, self.quiet = enabled, quiet
        self._bar = None
        self._t0 = time.monotonic()
        self.start, self.total = start, total
        if enabled and not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]RL"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = (f"reward {metrics.get('reward/mean', float('nan')):.3f}  "
                f"entropy {metrics.get('entropy/mean', float('nan')):.3f}  "
                f"{metrics.get('time/step_s', 0.0):.1f}s/step")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            done = step - self.start
            eta = (time.monotonic() - self._t0) / max(done, 1) * (self.total - step)
            log.info("step %d/%d  %s  eta %.0fs", step, self.total, info, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
