"""Start rollout servers as subprocesses and wait until they answer `/health_generate`.

`launch_sglang(model_path, n_servers=, tp=, ...)` runs
`python -m sglang.launch_server --model-path M --tp-size T --mem-fraction-static F
--host H --port P` per server (each on its own block of GPUs through
CUDA_VISIBLE_DEVICES); `launch_megaent(model_path, ...)` runs `megaent serve`
(the `megaent` console script) the same way, for CPU runs and tests.
Both return a `ServerGroup` (urls, processes, stop()).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Sequence

import httpx

from megaent.rollout.types import RolloutError

log = logging.getLogger(__name__)
SGLANG_MISSING = ("SGLang is not installed: pip install 'megaent[sglang]' on a GPU node, or use "
                  "rollout.engine=embedded (or rollout.engine=http with `megaent serve`)")


def megaent_command() -> list[str]:
    """The installed `megaent` console script next to this interpreter (else on PATH, else `python -m`)."""
    local = Path(sys.executable).with_name("megaent")
    exe = str(local) if local.is_file() else shutil.which("megaent")
    return [exe] if exe else [sys.executable, "-m", "megaent.cli"]


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


@dataclass
class ServerGroup:
    urls: list[str]
    procs: list[subprocess.Popen]
    logs: list[Optional[IO]] = field(default_factory=list)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Terminate every server (SIGTERM, then SIGKILL after timeout_s)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            if f is not None:
                f.close()

    def __enter__(self) -> "ServerGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_healthy(urls: Sequence[str], procs: Sequence[subprocess.Popen], *, timeout_s: float) -> None:
    """Poll GET /health_generate on every url until 200; RolloutError on a dead process or the deadline."""
    deadline = time.monotonic() + timeout_s
    pending = dict(zip(urls, procs))
    with httpx.Client(timeout=30.0) as http:
        while pending:
            for url, proc in list(pending.items()):
                if proc.poll() is not None:
                    raise RolloutError(f"rollout server {url} exited with code {proc.returncode} before it became "
                                       f"healthy; see its log")
                try:
                    if http.get(url + "/health_generate").status_code == 200:
                        del pending[url]
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise RolloutError(f"rollout servers {sorted(pending)} not healthy after {timeout_s:.0f} s; "
                                   "raise the timeout or check their logs")
            if pending:
                time.sleep(0.5)


def _launch(cmds: list[list[str]], urls: list[str], envs: list[dict], *, log_dir: Optional[Path],
            timeout_s: float) -> ServerGroup:
    procs, logs = [], []
    try:
        for k, (cmd, env) in enumerate(zip(cmds, envs)):
            f = open(Path(log_dir) / f"rollout_server_{k}.log", "ab") if log_dir is not None else None
            logs.append(f)
            log.info("starting rollout server %d: %s", k, " ".join(cmd))
            procs.append(subprocess.Popen(cmd, env=env, stdout=f or subprocess.DEVNULL, stderr=subprocess.STDOUT))
        group = ServerGroup(urls, procs, logs)
        wait_healthy(urls, procs, timeout_s=timeout_s)
        return group
    except BaseException:
        ServerGroup(urls[:len(procs)], procs, logs).stop(timeout_s=5)
        raise


def launch_sglang(model_path: str, *, n_servers: int = 1, tp: int = 1, mem_fraction: float = 0.8,
                  host: str = "127.0.0.1", base_port: int = 30000, gpu_ids: Optional[Sequence[int]] = None,
                  extra_args: Sequence[str] = (), log_dir: Optional[Path] = None, timeout_s: float = 900.0
                  ) -> ServerGroup:
    """Start n SGLang servers (server k on GPUs gpu_ids[k*tp:(k+1)*tp], port base_port + k)."""
    if not sglang_available():
        raise RolloutError(SGLANG_MISSING)
    gpu_ids = list(gpu_ids) if gpu_ids is not None else list(range(n_servers * tp))
    if len(gpu_ids) < n_servers * tp:
        raise RolloutError(f"{n_servers} SGLang servers x tp {tp} need {n_servers * tp} GPUs, got {len(gpu_ids)}; "
                           "lower rollout.sglang_tp or the server count")
    cmds, urls, envs = [], [], []
    for k in range(n_servers):
        port = base_port + k
        cmds.append([sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--tp-size", str(tp),
                     "--mem-fraction-static", str(mem_fraction), "--host", host, "--port", str(port),
                     *extra_args])
        urls.append(f"http://{host}:{port}")
        envs.append({**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids[k * tp:(k + 1) * tp]))})
    return _launch(cmds, urls, envs, log_dir=log_dir, timeout_s=timeout_s)


def launch_megaent(model_path: str, *, ports: Sequence[int], host: str = "127.0.0.1",
                   extra_args: Sequence[str] = (), log_dir: Optional[Path] = None, timeout_s: float = 300.0,
                   env: Optional[dict] = None) -> ServerGroup:
    """Start one `megaent serve` (TP = 1) per port on this machine, through the `megaent` console script."""
    base_env = {**os.environ, **(env or {})}
    bind = [] if host == "127.0.0.1" else ["--host", host]  # default: the README's `megaent serve --model M --port P`
    cmds = [[*megaent_command(), "serve", "--model", model_path, *bind, "--port", str(p), *extra_args] for p in ports]
    return _launch(cmds, [f"http://{host}:{p}" for p in ports], [base_env] * len(ports), log_dir=log_dir,
                   timeout_s=timeout_s)
