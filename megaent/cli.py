"""`megaent` command line: one thin function per verb.

    megaent train CONFIG [key=value ...]     run RL (or --resume RUN_DIR)
    megaent serve --model HF_DIR             SGLang-compatible rollout server
    megaent convert SRC DST                  HF <-> megaent checkpoints
    megaent submit CONFIG --nodes N ...      render / submit the Slurm job
    megaent eval CONFIG_OR_CKPT --data ...   pass@1 / pass@k
    megaent fit-law RUN_DIR                  fit R = -a exp(H) + b
    megaent plot RUN_DIR [RUN_DIR ...]       entropy / reward / covariance curves

User errors (bad config, missing file) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

EXIT_USAGE = 2


class UserError(Exception):
    """An error in what the user asked for; printed as one line, exit code 2."""


def _cmd_train(args: argparse.Namespace) -> int:
    from megaent.config import field_docs, load_config

    if args.help_config:
        for key, default, doc in field_docs():
            print(f"{key:42s} {default:>14s}  {doc}")
        return 0
    if args.resume:
        from megaent.trainer.run import resume

        return resume(args.resume, overrides=args.overrides)
    if not args.config:
        raise UserError("megaent train: give a CONFIG file (e.g. configs/demo.yaml) or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    from megaent.trainer.run import train

    return train(cfg, config_path=args.config)


def _cmd_serve(args: argparse.Namespace) -> int:
    from megaent.rollout.server import main as serve_main

    return serve_main(args.rest) or 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from megaent.model.convert import convert

    convert(args.src, args.dst, tp=args.tp, pp=args.pp, to=args.to)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from megaent.slurm.submit import main as submit_main

    return submit_main(args.rest) or 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from megaent.trainer.evaluate import main as eval_main

    return eval_main(args.rest) or 0


def _cmd_fit_law(args: argparse.Namespace) -> int:
    from megaent.trainer.law import fit_law_cli

    return fit_law_cli(args.run_dirs, early_fraction=args.early_fraction, out=args.out)


def _cmd_plot(args: argparse.Namespace) -> int:
    from megaent.trainer.plots import plot_runs

    path = plot_runs(args.run_dirs, out=args.out)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    t = sub.add_parser("train", help="run RL training", description="Run RL from a YAML config with dotted "
                       "key=value overrides, e.g. `megaent train configs/demo.yaml algorithm.policy_loss=clip_cov`.")
    t.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value (see --help-config)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest complete checkpoint")
    t.add_argument("--help-config", action="store_true", help="list every config key with default and meaning")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("serve", help="SGLang-compatible HTTP rollout server", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_serve)

    c = sub.add_parser("convert", help="convert between HF and megaent checkpoints",
                       description="SRC and DST are HF directories or megaent checkpoint directories "
                       "(a run's checkpoints/step_N); the direction follows from SRC.")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel layout to load through (default 1)")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel layout to load through (default 1)")
    c.add_argument("--to", choices=["hf", "megaent"], default=None,
                   help="target format (default: the other one; --to hf on a HF source is a round trip)")
    c.set_defaults(fn=_cmd_convert)

    sb = sub.add_parser("submit", help="render and submit the Slurm job", add_help=False)
    sb.add_argument("rest", nargs=argparse.REMAINDER)
    sb.set_defaults(fn=_cmd_submit)

    e = sub.add_parser("eval", help="pass@1 / pass@k evaluation", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(fn=_cmd_eval)

    f = sub.add_parser("fit-law", help="fit the entropy-performance law R = -a exp(H) + b")
    f.add_argument("run_dirs", nargs="+")
    f.add_argument("--early-fraction", type=float, default=0.25, help="fit on this first fraction, predict the rest")
    f.add_argument("--out", default=None, help="PNG path (default RUN_DIR/entropy_law.png)")
    f.set_defaults(fn=_cmd_fit_law)

    pl = sub.add_parser("plot", help="entropy, reward and covariance curves of runs in one PNG")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", default=None, help="PNG path (default FIRST_RUN_DIR/curves.png)")
    pl.set_defaults(fn=_cmd_plot)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megaent.config import ConfigError
    from megaent.model.backends import BackendError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fn: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "fn", None)
    if fn is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return fn(args)
    except (ConfigError, UserError, BackendError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"megaent {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
