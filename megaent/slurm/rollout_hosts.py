"""Rollout-node URLs for a Slurm job: write RUN_DIR/rollout_hosts.txt, wait for health, print overrides.

    python -m megaent.slurm.rollout_hosts --hosts node7,node8 --port 30000 \
        --out RUN_DIR/rollout_hosts.txt --wait-s 1800

writes one base URL per line (`http://node7:30000`), polls `GET /health` on
each (SGLang and `megaent serve` both answer it) until all return 200, then
prints the trainer overrides, one per line:

    rollout.engine=http
    rollout.urls=[http://node7:30000,http://node8:30000]

Exit 1 (and a message on stderr) when a server is not healthy in time. The
sbatch script (megaent/slurm/template.py) reads the printed lines into the
train command, so the trainer needs no Slurm knowledge.
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence


def host_urls(hosts: Sequence[str], *, port: int) -> list[str]:
    """Base URL of the server on each host, in allocation order."""
    return [f"http://{h}:{port}" for h in hosts if h]


def overrides_for(urls: Sequence[str]) -> list[str]:
    """The `megaent train` overrides that point the trainer at `urls`."""
    return ["rollout.engine=http", f"rollout.urls=[{','.join(urls)}]"]


def is_healthy(url: str, *, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(urls: Sequence[str], *, wait_s: float, poll_s: float = 2.0) -> list[str]:
    """Poll until every URL answers /health with 200; returns the URLs still down when `wait_s` runs out."""
    deadline = time.monotonic() + wait_s
    pending = list(urls)
    while pending:
        pending = [u for u in pending if not is_healthy(u)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return pending


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megaent.slurm.rollout_hosts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", required=True, help="comma-separated host names (the job's rollout nodes)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--out", required=True, help="file to write the URLs to (RUN_DIR/rollout_hosts.txt)")
    p.add_argument("--wait-s", type=float, default=1800.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    urls = host_urls(args.hosts.split(","), port=args.port)
    if not urls:
        print(f"rollout_hosts: --hosts={args.hosts!r} names no host; the job has no rollout nodes", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(u + "\n" for u in urls))
    down = wait_healthy(urls, wait_s=args.wait_s)
    if down:
        print(f"rollout_hosts: no healthy /health after {args.wait_s:.0f} s from {', '.join(down)}; "
              f"see the rollout logs in {out.parent}/logs", file=sys.stderr)
        return 1
    print("\n".join(overrides_for(urls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
