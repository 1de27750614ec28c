"""`megaent eval`: pass@1 and pass@k of a policy on a prompt set, with n samples per prompt.

    megaent eval RUN_DIR                        a run directory (its hf_final export and config)
    megaent eval HF_DIR --data prompts.jsonl    a HF checkpoint on a jsonl/parquet file (data.* keys as in train)
    megaent eval CONFIG                         a config (its model.path, or the demo's warmed policy)

    megaent eval runs/try --prompts 8 --n 4     e.g. the run of `megaent train --help`

pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374): 1 - C(n-c, k) / C(n, k) per prompt,
averaged. Runs in one process on the embedded engine; prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path
from typing import Optional, Sequence

from megaent.config import ConfigError, load_config


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _resolve(target: str, overrides: Sequence[str]):  # -> (Config, hf_dir)
    p = Path(target)
    if (p / "config.yaml").is_file() and (p / "hf_final" / "config.json").is_file():
        cfg = load_config(p / "config.yaml", overrides)
        return cfg, p / "hf_final"
    if (p / "config.json").is_file():
        cfg = load_config(None, [f"model.path={p}", *overrides])
        return cfg, p
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return load_config(p, overrides), None
    raise ConfigError(f"megaent eval {target}: expected a run directory (with hf_final/), a HF checkpoint "
                      "directory (config.json) or a YAML config")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of `megaent eval` (also used by megaent.cli's subparser)."""
    ap.add_argument("target", help="run directory, HF checkpoint directory, or YAML config")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, applied left to right after --data")
    ap.add_argument("--data", help="prompt file (.jsonl/.parquet), shorthand for data.path=FILE; "
                    "default: the config's data section")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    ap.add_argument("--k", default="1,4", help="comma-separated k values for pass@k (each <= n)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts to evaluate (default 64)")
    ap.add_argument("--temperature", type=float, default=None, help="default: rollout.temperature")


def eval_overrides(data: Optional[str], overrides: Sequence[str]) -> list[str]:
    """The overrides eval applies on top of the target's config, in order: `--data` first (a shorthand),
    then the user's key=value words left to right, as `megaent train` applies them (the last one wins)."""
    return ([f"data.path={data}"] if data else []) + list(overrides)


def run_args(args: argparse.Namespace) -> int:
    """`megaent eval` for parsed arguments."""
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise ConfigError(f"--k {args.k}: give comma-separated integers, e.g. --k 1,4") from None
    if any(k < 1 or k > args.n for k in ks):
        raise ConfigError(f"--k {args.k}: every k must be in [1, --n={args.n}]")
    cfg, hf_dir = _resolve(args.target, eval_overrides(args.data, args.overrides))
    return run_eval(cfg, hf_dir, n=args.n, ks=ks, prompts=args.prompts, temperature=args.temperature)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="megaent eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run_args(ap.parse_intermixed_args(argv))


def run_eval(cfg, hf_dir: Optional[Path], *, n: int, ks: list[int], prompts: int,
             temperature: Optional[float]) -> int:
    import torch

    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.rollout.embedded import EmbeddedEngine
    from megaent.rollout.types import SamplingParams
    from megaent.trainer import components

    state = init_parallel(1, 1)
    try:
        if hf_dir is None:
            hf_dir = components.prepare_policy_dir(cfg, run_dir=Path("."), state=state)
        tok = components.load_tokenizer(hf_dir)
        # Generation only: megaent's inference decoder (KV cache) on the checkpoint, as the embedded rollout uses.
        from megaent.model import load_hf

        policy = load_hf(str(hf_dir), state, dtype=getattr(torch, cfg.model.dtype))
        eos = components.eos_ids(tok, hf_dir)
        engine = EmbeddedEngine(policy, state, eos_token_ids=eos, seed=cfg.trainer.seed)
        # Held-out evaluation stream: another seed than training uses.
        stream = components.build_prompts(cfg.data, tok, seed=cfg.trainer.seed + 7919, batch_size=prompts,
                                          cap=True)  # --prompts larger than the file: all of it
        batch = stream.next_batch()
        params = SamplingParams(n=n, max_new_tokens=cfg.rollout.max_new_tokens,
                                temperature=cfg.rollout.temperature if temperature is None else temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop_token_ids=tuple(eos),
                                seed=cfg.trainer.seed)
        with torch.no_grad():
            groups = engine.generate([list(p.ids) for p in batch], params)
        scorer = components.build_scorer(cfg.reward, cfg.data)
        try:
            texts = [tok.decode(s.output_ids, skip_special_tokens=True) for g in groups for s in g]
            rewards, _ = scorer.score(texts, [p.answer for p in batch for _ in range(n)])
        finally:
            scorer.close()
        correct = [sum(r > 0.5 for r in rewards[i * n:(i + 1) * n]) for i in range(len(batch))]
        result = {"model": str(hf_dir), "prompts": len(batch), "n": n,
                  **{f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(batch) for k in ks}}
        for k in ks:
            print(f"pass@{k:<3d} {result[f'pass@{k}']:.4f}")
        print(json.dumps(result))
        return 0
    finally:
        destroy_parallel()
