"""`megaent submit`: render the sbatch script of a training run and hand it to `sbatch`.

    megaent submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--rollout-nodes M]
                   [--partition P] [--account A] [--time T] [--job-name NAME] [--run-dir DIR] [--dry-run]

    megaent submit configs/qwen2.5-7b-clip-cov.yaml --nodes 4 --gpus-per-node 8 --rollout-nodes 2 --dry-run
    megaent submit configs/demo.yaml --gpus-per-node 0 --tasks-per-node 2 --time 10 --dry-run   # CPU (gloo)

Defaults come from the config's `slurm` section; flags override it. The run
directory (trainer.run_dir, or runs/<config>-<time>) is fixed here, so every
restart of a requeued job resumes the same run. `--dry-run` prints the script;
otherwise it is written to RUN_DIR/train.sbatch, submitted, and the job id is
printed on stdout. Exit 2 for a bad request or a missing `sbatch`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megaent.slurm.render import SubmitError, job_spec, render_sbatch

EXIT_USAGE = 2

# CLI flag -> config key; a flag given on the command line becomes an override of that key.
_FLAG_KEYS = {
    "nodes": "slurm.nodes", "gpus_per_node": "slurm.gpus_per_node", "tasks_per_node": "slurm.tasks_per_node",
    "rollout_nodes": "slurm.rollout_nodes", "partition": "slurm.partition", "account": "slurm.account",
    "time": "slurm.time", "job_name": "slurm.job_name",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `megaent submit` (also used by megaent.cli's subparser)."""
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, passed to every start of the trainer")
    p.add_argument("--nodes", type=int, help="training nodes (slurm.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs = tasks per node; 0 = CPU tasks (slurm.gpus_per_node)")
    p.add_argument("--tasks-per-node", type=int, help="CPU tasks per node when --gpus-per-node 0")
    p.add_argument("--rollout-nodes", type=int, help="extra nodes running SGLang servers (slurm.rollout_nodes)")
    p.add_argument("--partition", help="Slurm partition (slurm.partition)")
    p.add_argument("--account", help="Slurm account (slurm.account)")
    p.add_argument("--time", help="wall-time limit, e.g. 24:00:00 (slurm.time)")
    p.add_argument("--job-name", help="job name (slurm.job_name)")
    p.add_argument("--run-dir", help="run directory (default: trainer.run_dir, else runs/<config>-<time>)")
    p.add_argument("--python", default="python",
                   help="interpreter on the nodes for the trainer, rollout servers and helpers (default: python)")
    p.add_argument("--entrypoint", default="",
                   help="command that takes `CONFIG key=value ...` instead of `PYTHON -m megaent.cli train`")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaent submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _run_dir(arg: Optional[str], from_config: str, config_path: Path) -> Path:
    if arg:
        return Path(arg).resolve()
    if from_config:
        return Path(from_config).resolve()
    return (Path("runs") / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def prepare(argv: Sequence[str] | argparse.Namespace) -> tuple[argparse.Namespace, Path, str]:
    """Parse (unless given parsed args), load the config with the flags merged in, render:
    (args, run_dir, script)."""
    from megaent.config import load_config

    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_intermixed_args(list(argv))
    # Strings go in double-quoted: unquoted, YAML 1.1 reads `--time 1:00:00` as the integer 3600.
    flag_overrides = [f"{key}={json.dumps(v) if isinstance(v, str) else v}" for name, key in _FLAG_KEYS.items()
                      if (v := getattr(args, name)) is not None]
    config_path = Path(args.config).resolve()
    cfg = load_config(config_path, [*args.overrides, *flag_overrides])
    run_dir = _run_dir(args.run_dir, cfg.trainer.run_dir, config_path)
    spec = job_spec(cfg, config_path=str(config_path), run_dir=str(run_dir), workdir=str(Path.cwd()),
                    overrides=tuple(o for o in args.overrides if not o.startswith("trainer.run_dir=")),
                    entrypoint=args.entrypoint, python=args.python)
    return args, run_dir, render_sbatch(spec)


def submit_script(script_path: Path) -> str:
    """`sbatch --parsable SCRIPT` -> job id. Raises SubmitError when sbatch is missing or refuses the job."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("`sbatch` not found on PATH: submit from a Slurm login node, print the script with "
                          "--dry-run, or start a local test cluster with slurm/local_cluster.sh")
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script_path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def run(args: argparse.Namespace) -> int:
    """Render and submit (or print, with --dry-run) for parsed arguments; 0, or 2 for a bad request."""
    from megaent.config import ConfigError

    try:
        args, run_dir, script = prepare(args)
        if args.dry_run:
            print(script, end="")
            return 0
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
        script_path = run_dir / "train.sbatch"
        script_path.write_text(script)
        job_id = submit_script(script_path)
    except (ConfigError, SubmitError) as exc:
        print(f"megaent submit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(job_id)
    print(f"megaent submit: job {job_id}, script {script_path}, logs {run_dir}/logs/", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser().parse_intermixed_args(list(argv)))


if __name__ == "__main__":
    sys.exit(main())
