"""`megaent` command line: one thin function per verb.

    megaent train CONFIG [key=value ...]     run RL (or --resume RUN_DIR [key=value ...])
    megaent serve --model HF_DIR             SGLang-compatible rollout server
    megaent convert SRC DST                  HF <-> megaent checkpoints
    megaent submit CONFIG --nodes N ...      render / submit the Slurm job
    megaent eval TARGET [--data FILE]        pass@1 / pass@k
    megaent fit-law RUN_DIR                  fit R = -a exp(H) + b
    megaent plot RUN_DIR [RUN_DIR ...]       entropy / reward / covariance curves
    megaent plan CONFIG [key=value ...]      memory per rank of the layout vs the GPU, and what to change

`megaent VERB --help` explains each verb. Options and key=value overrides may come in any order; overrides
apply left to right after the YAML (the last one wins). User errors (bad config, missing file, wrong
arguments) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

# Nothing heavy is imported at module level: `megaent --help` and `megaent VERB --help` must start in well
# under a second (torch, megatron-core and transformers take 5-10 s); each verb imports what it runs.

EXIT_USAGE = 2


class UserError(Exception):
    """An error in what the user asked for; printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user asked for something wrong". Read from the modules that were
    imported (a module that never ran cannot have raised), so this costs no import."""
    errs: list[type[BaseException]] = [UserError, FileNotFoundError, NotADirectoryError, PermissionError]
    for module, name in (("megaent.config.errors", "ConfigError"), ("megaent.config", "ConfigError"),
                         ("megaent.model.backends", "BackendError"), ("megaent.slurm.render", "SubmitError"),
                         ("megaent.data", "DataError")):
        exc = getattr(sys.modules.get(module), name, None)
        if isinstance(exc, type) and issubclass(exc, BaseException):
            errs.append(exc)
    return tuple(errs)


def _split_train_positionals(args: argparse.Namespace) -> tuple[Optional[str], list[str]]:
    """(config, overrides): argparse gives the first positional to CONFIG even when it is an override
    (`megaent train --resume RUN a=1`, or `megaent train a=1` with schema defaults)."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and (args.resume or ("=" in config and not Path(config).exists())):
        config, overrides = None, [config, *overrides]
    return config, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from megaent.trainer.signals import record_early

    record_early()  # a TERM/USR1 during the slow imports below still ends in checkpoint + exit 3
    from megaent.config import field_docs, load_config

    if args.help_config:
        for key, default, doc in field_docs():
            print(f"{key:42s} {default:>14s}  {doc}")
        return 0
    config, overrides = _split_train_positionals(args)
    if args.resume:
        if any(o.startswith("trainer.run_dir=") for o in overrides):
            raise UserError(f"--resume {args.resume}: drop the trainer.run_dir override; a resumed run stays in "
                            "its own directory (copy it first to branch off)")
        from megaent.trainer.run import resume

        return resume(args.resume, overrides=overrides)
    if not config:
        raise UserError("give a CONFIG file (e.g. megaent train configs/demo.yaml) or --resume RUN_DIR")
    cfg = load_config(config, overrides)
    from megaent.trainer.run import train

    return train(cfg, config_path=config)


SERVE_API_KEY_ENV = "MEGAENT_API_KEY"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """`megaent serve`'s options, defined here (not in megaent.rollout.server, which imports torch) so that
    `megaent serve --help` and its usage errors answer in well under a second."""
    p.add_argument("--model", required=True, help="HF checkpoint directory (Qwen2 / Llama family) to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1, loopback only); any other address requires --api-key")
    p.add_argument("--port", type=int, default=30000, help="TCP port (default 30000, SGLang's)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health* (SGLang's --api-key); "
                   f"default ${SERVE_API_KEY_ENV}, which keeps the key off the command line")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch this many ranks with torchrun)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random streams of requests without sampling_seed")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the batcher waits for more requests before a decode (default 5 ms)")
    p.add_argument("--max-batch-rows", type=int, default=256,
                   help="most sample rows (prompts x n) decoded together (default 256)")
    p.add_argument("--served-model-name", default=None,
                   help="model name in /v1/models and OpenAI answers (default: the --model path, as SGLang)")
    p.add_argument("--context-length", type=int, default=None,
                   help="prompt + max_new_tokens limit (default: max_position_embeddings of config.json)")
    p.add_argument("--log-level", default="INFO", help="logging level: DEBUG shows ignored request fields")


SERVE_DESCRIPTION = """\
SGLang-compatible rollout server on the megaent policy: SGLang's native API (POST /generate,
/update_weights_from_disk, /pause_generation, ...) and OpenAI's (/v1/completions, /v1/chat/completions,
/v1/models). Binds loopback by default; another --host needs an API key.

  megaent serve --model HF_DIR --port 30000
  torchrun --nproc-per-node 2 -m megaent.rollout.server --model HF_DIR --tp 2"""


def run_serve(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """Check `megaent serve`'s arguments (usage errors through `p.error`, exit 2), then serve until stopped."""
    if not Path(a.model).is_dir():
        p.error(f"--model {a.model}: no such directory (give a HF checkpoint directory)")
    api_key = a.api_key or os.environ.get(SERVE_API_KEY_ENV) or None
    if not is_loopback(a.host) and not api_key:
        p.error(f"--host {a.host}: a non-loopback address needs an API key; pass --api-key KEY or set "
                f"${SERVE_API_KEY_ENV} (clients send `Authorization: Bearer KEY`), or bind 127.0.0.1")
    if a.context_length is not None and a.context_length < 2:
        p.error(f"--context-length {a.context_length}: must be >= 2")
    level = "DEBUG" if getattr(a, "verbose", False) else a.log_level.upper()
    if not isinstance(logging.getLevelName(level), int):
        p.error(f"--log-level {a.log_level}: must be one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from megaent.rollout.server import serve

    serve(a.model, host=a.host, port=a.port, tp=a.tp, dtype=a.dtype, seed=a.seed, window_ms=a.batch_window_ms,
          max_rows=a.max_batch_rows, api_key=api_key, served_model_name=a.served_model_name,
          context_length=a.context_length)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    return run_serve(args.parser, args)


def _launched_world() -> int:
    """Processes this command was started with: torchrun's WORLD_SIZE, srun's SLURM_NTASKS, else 1."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.tp < 1 or args.pp < 1:
        raise UserError(f"--tp {args.tp} --pp {args.pp}: both must be >= 1")
    world, need = _launched_world(), args.tp * args.pp
    if world % need:
        raise UserError(f"--tp {args.tp} --pp {args.pp} needs a multiple of {need} processes, this is {world}; "
                        f"run it as `torchrun --nproc-per-node {need} -m megaent.cli convert {args.src} "
                        f"{args.dst} --tp {args.tp} --pp {args.pp}` (or drop --tp/--pp for one process)")
    from megaent.model.convert import convert

    convert(args.src, args.dst, tp=args.tp, pp=args.pp, to=args.to)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from megaent.slurm.submit import run as submit_run

    return submit_run(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from megaent.trainer.evaluate import run_args as eval_run

    return eval_run(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from megaent.trainer.plan import plan_cli

    return plan_cli(args.config, args.overrides, gpu_mem_gb=args.gpu_mem_gb, world=args.world)


def _run_dirs(paths: Sequence[str]) -> list[str]:
    """The run directories among `paths`: a shell glob such as `runs/demo/*_seed*` also matches the runs'
    `.log` files, which are skipped with a note; a path that does not exist, or no directory at all, is an
    error."""
    missing = [x for x in paths if not os.path.exists(x)]
    if missing:
        raise UserError(f"{missing[0]}: no such run directory")
    dirs = [x for x in paths if os.path.isdir(x)]
    if not dirs:
        raise UserError(f"{paths[0]}: not a run directory; pass directories written by `megaent train`")
    no_metrics = [d for d in dirs if not os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    if no_metrics:
        raise UserError(f"{no_metrics[0]}: no metrics.jsonl; pass run directories written by `megaent train`")
    if len(dirs) < len(paths):
        skipped = [x for x in paths if not os.path.isdir(x)]
        print(f"megaent: skipping {len(skipped)} file(s) that are not run directories "
              f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})", file=sys.stderr)
    return dirs


def _cmd_fit_law(args: argparse.Namespace) -> int:
    fraction = args.fit_fraction
    if args.early_fraction is not None:
        if fraction is not None and fraction != args.early_fraction:
            raise UserError(f"--early-fraction {args.early_fraction} and --fit-fraction {fraction} disagree; "
                            "give only --fit-fraction (--early-fraction is its deprecated old name)")
        print("megaent fit-law: --early-fraction is deprecated; use --fit-fraction", file=sys.stderr)
        fraction = args.early_fraction
    if fraction is not None and not 0.0 < fraction < 1.0:  # before the imports below: a typo answers at once
        raise UserError(f"--fit-fraction {fraction}: must be in (0, 1), the share of each run's first steps the "
                        "law is fitted on (0.25: the first quarter)")
    if args.bootstrap is not None and args.bootstrap < 1:
        raise UserError(f"--bootstrap {args.bootstrap}: must be >= 1 resample (about 200 gives a stable interval)")
    run_dirs = _run_dirs(args.run_dirs)
    from megaent.trainer.law import fit_law_cli

    kw = {k: v for k, v in (("fit_fraction", fraction), ("n_boot", args.bootstrap)) if v is not None}
    try:  # the defaults live in megaent.trainer.law
        return fit_law_cli(run_dirs, out=args.out, seed=args.seed, **kw)
    except ValueError as exc:  # too few steps, constant entropy, a corrupt metrics.jsonl line: the user's data
        raise UserError(str(exc)) from None


def _cmd_plot(args: argparse.Namespace) -> int:
    from megaent.trainer.plots import plot_runs

    path = plot_runs(_run_dirs(args.run_dirs), out=args.out)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; `parser.verbs` maps each verb to its subparser (see `parse`)."""
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="megaent", description=__doc__, formatter_class=raw)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    t = sub.add_parser("train", help="run RL training", formatter_class=raw, description="""\
Run RL from a YAML config with dotted key=value overrides (applied left to right after the YAML), or
continue a run from its latest complete checkpoint.

  megaent train configs/demo.yaml trainer.steps=4 trainer.run_dir=runs/try
  megaent train --resume runs/try trainer.steps=6     # same run dir; overrides apply on top of its config
  megaent train --help-config | grep clip_cov         # every key, its default and meaning
  torchrun --nproc-per-node 2 -m megaent.cli train configs/demo.yaml parallel.tp=2 trainer.steps=2 trainer.run_dir=runs/tp2

A run directory holds config.yaml, metrics.jsonl (one JSON row per step), checkpoints/ and, at the end,
hf_final/ (a HuggingFace export). --resume continues at the step after its latest complete checkpoint.""")
    t.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value (see --help-config)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest complete checkpoint (its config.yaml + overrides)")
    t.add_argument("--help-config", action="store_true", help="list every config key with default and meaning")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("serve", help="SGLang-compatible HTTP rollout server", description=SERVE_DESCRIPTION,
                       formatter_class=raw)
    add_serve_arguments(s)
    s.set_defaults(fn=_cmd_serve, parser=s)

    c = sub.add_parser("convert", help="convert between HF and megaent checkpoints", formatter_class=raw,
                       description="""\
SRC and DST are HF directories (config.json + safetensors) or megaent checkpoint directories (a run's
checkpoints/step_N); the direction follows from SRC. A TP x PP layout needs TP*PP processes:

  megaent convert runs/try/hf_final runs/try/as_megaent       # HF -> megaent, one process
  megaent convert runs/try/as_megaent runs/try/hf_again       # megaent -> HF
  torchrun --nproc-per-node 4 -m megaent.cli convert HF_DIR OUT_DIR --tp 2 --pp 2""")
    c.add_argument("src", help="HF directory or megaent checkpoint directory")
    c.add_argument("dst", help="output directory")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel layout to load through (default 1)")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel layout to load through (default 1)")
    c.add_argument("--to", choices=["hf", "megaent"], default=None,
                   help="target format (default: the other one; --to hf on a HF source is a round trip)")
    c.set_defaults(fn=_cmd_convert)

    from megaent.slurm.submit import add_arguments as submit_arguments, __doc__ as submit_doc
    from megaent.trainer.evaluate import add_arguments as eval_arguments, __doc__ as eval_doc

    sb = sub.add_parser("submit", help="render and submit the Slurm job", description=submit_doc,
                        formatter_class=raw)
    submit_arguments(sb)
    sb.set_defaults(fn=_cmd_submit)

    e = sub.add_parser("eval", help="pass@1 / pass@k evaluation", description=eval_doc, formatter_class=raw)
    eval_arguments(e)
    e.set_defaults(fn=_cmd_eval)

    f = sub.add_parser("fit-law", help="fit the entropy-performance law R = -a exp(H) + b", formatter_class=raw,
                       description="""\
Fit R = -a exp(H) + b (Cui et al. 2025, Eq. 1) on the first --fit-fraction of each run's steps (entropy/mean,
reward/mean of metrics.jsonl), per run and pooled over all RUN_DIRs (e.g. a method's seeds), and check it on
the steps it never saw. Prints a table: a, b, the prediction RMSE on the held-out last 50% of the steps and on
all the rest, R^2 of the fit on all steps, and the predicted ceiling R(H=0) = b - a with the mean and 90%
interval of a bootstrap over the fitted steps. Writes the PNG (reward vs entropy, fitted and held-out steps,
the fit extrapolated to H = 0 with the ceiling's band) and a JSON summary next to it (law.png -> law.json).

  megaent fit-law runs/try
  megaent fit-law runs/demo/grpo_seed0 runs/demo/grpo_seed1 --fit-fraction 0.25 --out law.png""")
    f.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (files are skipped)")
    f.add_argument("--fit-fraction", type=float, default=None, metavar="F",
                   help="fit on each run's first F of the steps, in (0, 1) (default 0.25)")
    f.add_argument("--early-fraction", type=float, default=None, metavar="F",
                   help="deprecated name of --fit-fraction")
    f.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="bootstrap resamples of the fitted steps for the ceiling's interval (default 200)")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resampling (default 0)")
    f.add_argument("--out", default=None,
                   help="PNG path; the JSON summary goes next to it (default RUN_DIR/entropy_law.png, .json)")
    f.set_defaults(fn=_cmd_fit_law)

    pl = sub.add_parser("plot", help="entropy, reward and covariance curves of runs in one PNG",
                        formatter_class=raw, description="""\
Curves of entropy, reward, covariance and response length per step, and reward against entropy with the
fitted law, for one or more runs. Directories named NAME_seedN are drawn as one method (mean and min-max
band over seeds); files among the arguments (a glob's .log files) are skipped.

  megaent plot runs/try
  megaent plot runs/demo/*_seed* --out runs/demo/curves.png""")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (files are skipped)")
    pl.add_argument("--out", default=None, help="PNG path (default FIRST_RUN_DIR/curves.png)")
    pl.set_defaults(fn=_cmd_plot)
    from megaent.trainer.plan import __doc__ as plan_doc

    pn = sub.add_parser("plan", help="memory per training rank of a config's layout against the GPU",
                        formatter_class=raw, description=plan_doc.split("\n\n")[0] + """

Per pipeline stage: parameters, fp32 main gradients, optimizer state (sharded over DP by the distributed
optimizer), activations (per micro-batch, times the micro-batches 1F1B keeps in flight), the fused LM head's
chunks, one layer's backward workspace and a colocated rollout engine's share; the total against --gpu-mem-gb.
Exit 0 when it fits; else 1 and the smallest override that fits (recompute, micro-batch tokens, TP, PP).
Shapes come from model.path/config.json, or for the shipped recipes from their published config (no download).

  megaent plan configs/qwen2.5-7b-grpo.yaml
  megaent plan configs/qwen2.5-32b-grpo.yaml --gpu-mem-gb 40
  megaent plan configs/qwen2.5-7b-grpo.yaml parallel.tp=1 model.activation_checkpointing=none""")
    pn.add_argument("config", help="YAML config (configs/*.yaml)")
    pn.add_argument("overrides", nargs="*", help="dotted overrides key=value (as megaent train takes them)")
    pn.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    pn.add_argument("--world", type=int, default=None,
                    help="training ranks (default slurm.nodes x slurm.gpus_per_node of the config)")
    pn.set_defaults(fn=_cmd_plan)
    p.verbs = sub.choices  # type: ignore[attr-defined]
    return p


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `megaent [-v] VERB ...` with the verb's options and positionals in any order.

    argparse's plain subparser parse stops taking positionals after the first option
    (`megaent submit CONFIG --nodes 2 key=value` would reject key=value), so the verb's own parser
    parses its words with `parse_intermixed_args`.
    """
    argv = list(argv)
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))
    verbs = parser.verbs  # type: ignore[attr-defined]
    if i == len(argv) or argv[i] not in verbs:
        return parser.parse_args(argv)  # help, no verb, or an unknown verb: argparse's own messages
    ns = parser.parse_args(argv[:i])
    ns.verb = argv[i]
    verb = verbs[argv[i]]
    try:
        return verb.parse_intermixed_args(argv[i + 1:], ns)
    except TypeError:  # a parser intermixed parsing cannot handle (e.g. REMAINDER): the plain parse
        return verb.parse_args(argv[i + 1:], ns)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # megatron-core logs its import-time probes at INFO; a usage error stays one line
        logging.getLogger("megatron").setLevel(logging.WARNING)
    fn: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "fn", None)
    if fn is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return fn(args)
    except BrokenPipeError:
        # `megaent train --help-config | head`: the reader left; end quietly as `cat` would (128 + SIGPIPE),
        # with stdout pointed at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"megaent {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
