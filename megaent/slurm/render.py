"""Render the sbatch script of a megaent training job: pure functions, no I/O.

`job_spec(cfg, ...)` turns a loaded `Config` (its `slurm` section, plus the
model path and SGLang knobs for rollout nodes) into a `JobSpec`;
`render_sbatch(spec)` fills `megaent.slurm.template.SBATCH_TEMPLATE`.

Layout of a job with N training nodes and M rollout nodes (N + M nodes):
- training: `srun` over the first N nodes, one task per GPU (or
  `tasks_per_node` CPU tasks with gloo); each task finds its rank from
  SLURM_PROCID / SLURM_NTASKS and meets the others at MASTER_ADDR = the first
  node, MASTER_PORT = 20000 + job id % 20000 (`megaent.parallel.launch`).
- rollout: the last M nodes each run one server (SGLang on GPUs with
  `--tp-size rollout.sglang_tp --dp-size G / sglang_tp`, `megaent serve` on
  CPU), both behind a per-job API key the script generates and exports
  (MEGAENT_API_KEY: SGLang's `--api-key`, read by `megaent serve` and the
  trainer's SGLangClient); `python -m megaent.slurm.rollout_hosts` writes their URLs to
  RUN_DIR/rollout_hosts.txt, waits for /health, and the trainer gets
  `rollout.engine=http rollout.urls=[...]`.
- preemption: `--signal=B:USR1@slurm.signal_before_s`, forwarded by the batch
  shell to the training srun; exit 3 -> `scontrol requeue` (see template).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from megaent.config.schema import Config
from megaent.config.validate import fill_server_cmd
from megaent.slurm.template import SBATCH_TEMPLATE

REQUEUE_EXIT_CODE = 3  # the trainer's "checkpointed after a stop signal, requeue me"
TRAIN_MODULE = "-m megaent.cli train"  # run by JobSpec.python unless an entrypoint replaces it
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^(UNLIMITED|INFINITE|infinite|unlimited)$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(ValueError):
    """A bad job request; the message names the option, the value and the fix (exit code 2)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the sbatch script depends on; built by `job_spec`, rendered by `render_sbatch`."""

    config_path: str  # absolute path of the YAML the trainer loads
    run_dir: str  # absolute; fixed at submit time so a requeued job resumes the same run
    workdir: str  # --chdir of the job (where relative paths in the config resolve)
    nodes: int = 1  # training nodes
    gpus_per_node: int = 8  # 0 = CPU tasks (gloo)
    tasks_per_node: int = 0  # CPU mode only
    rollout_nodes: int = 0
    partition: str = ""
    account: str = ""
    time: str = "24:00:00"
    job_name: str = "megaent"
    signal_before_s: int = 120
    overrides: tuple[str, ...] = ()  # key=value passed to every (re)start of the trainer
    entrypoint: str = ""  # command that takes `CONFIG key=value ...`; empty = `{python} -m megaent.cli train`
    python: str = "python"  # interpreter on the nodes (trainer, rollout-host helper, servers)
    model_path: str = ""  # HF checkpoint the rollout servers load
    sglang_tp: int = 1
    sglang_mem_fraction: float = 0.8
    rollout_port: int = 30000
    rollout_wait_s: int = 1800
    rollout_server_cmd: str = ""  # slurm.rollout_server_cmd template; empty = SGLang (GPU) / megaent serve (CPU)
    extra_sbatch: tuple[str, ...] = field(default_factory=tuple)
    setup: str = ""

    @property
    def train_tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.train_tasks_per_node


def job_spec(cfg: Config, *, config_path: str, run_dir: str, workdir: str, overrides: tuple[str, ...] = (),
             entrypoint: str = "", python: str = "python") -> JobSpec:
    """Build and check a `JobSpec` from a loaded config (CLI flags already merged into `cfg.slurm`).

    Raises `SubmitError` naming the `slurm.*` key, its value and the fix.
    """
    s = cfg.slurm
    spec = JobSpec(
        config_path=config_path, run_dir=run_dir, workdir=workdir, nodes=s.nodes, gpus_per_node=s.gpus_per_node,
        tasks_per_node=s.tasks_per_node, rollout_nodes=s.rollout_nodes, partition=s.partition, account=s.account,
        time=s.time, job_name=s.job_name, signal_before_s=s.signal_before_s, overrides=tuple(overrides),
        entrypoint=entrypoint, python=python, model_path=cfg.model.path, sglang_tp=cfg.rollout.sglang_tp,
        sglang_mem_fraction=cfg.rollout.sglang_mem_fraction, rollout_port=s.rollout_port,
        rollout_wait_s=s.rollout_wait_s, rollout_server_cmd=s.rollout_server_cmd, extra_sbatch=tuple(s.extra_sbatch),
        setup=s.setup,
    )
    check_spec(spec, world_divisor=cfg.parallel.tp * cfg.parallel.pp)
    return spec


def _need(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise SubmitError(f"{key}={value!r}: {fix}")


def check_spec(spec: JobSpec, *, world_divisor: int = 1) -> None:
    """Reject requests Slurm or the trainer would fail on later (message: key, value, fix)."""
    _need(spec.nodes >= 1, "slurm.nodes", spec.nodes, "must be >= 1 (--nodes)")
    _need(spec.gpus_per_node >= 0, "slurm.gpus_per_node", spec.gpus_per_node, "must be >= 0 (0 = CPU tasks)")
    _need(spec.gpus_per_node > 0 or spec.tasks_per_node >= 1, "slurm.tasks_per_node", spec.tasks_per_node,
          "CPU jobs (--gpus-per-node 0) need --tasks-per-node K >= 1 (gloo ranks per node)")
    _need(spec.rollout_nodes >= 0, "slurm.rollout_nodes", spec.rollout_nodes, "must be >= 0 (--rollout-nodes)")
    _need(bool(_TIME_RE.match(spec.time)), "slurm.time", spec.time,
          "use Slurm's format: minutes, HH:MM:SS or D-HH:MM:SS (e.g. --time 24:00:00)")
    # YAML 1.1 reads an unquoted `time: 24:00:00` as the integer 86400, which Slurm takes as minutes (60 days).
    _need(not (spec.time.isdigit() and int(spec.time) >= 7 * 24 * 60), "slurm.time", spec.time,
          "minutes >= a week: an unquoted H:M:S in YAML becomes seconds; quote it (time: \"24:00:00\") "
          "or write D-HH:MM:SS")
    _need(spec.signal_before_s >= 0, "slurm.signal_before_s", spec.signal_before_s, "must be >= 0 seconds")
    _need(not re.search(r"\s", spec.run_dir), "trainer.run_dir", spec.run_dir,
          "must not contain whitespace (it appears in #SBATCH --output, which cannot be quoted)")
    _need(spec.world_size % world_divisor == 0, "slurm.nodes", spec.nodes,
          f"the world size {spec.world_size} (nodes x tasks per node) must be a multiple of "
          f"parallel.tp * parallel.pp = {world_divisor}")
    if spec.rollout_nodes:
        _need(bool(spec.model_path), "model.path", spec.model_path,
              "rollout nodes serve a HF checkpoint: set model.path=/path/to/hf_model")
        if spec.gpus_per_node:
            _need(spec.gpus_per_node % spec.sglang_tp == 0, "rollout.sglang_tp", spec.sglang_tp,
                  f"must divide slurm.gpus_per_node={spec.gpus_per_node} (one SGLang server per node, "
                  f"dp = gpus / tp)")


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every `{{name}}`; unknown placeholders and unused values are errors (typos in templates)."""
    names = set(_PLACEHOLDER.findall(template))
    missing, unused = names - values.keys(), values.keys() - names
    if missing or unused:
        raise SubmitError(f"sbatch template: placeholders without values {sorted(missing)}, "
                          f"values without placeholders {sorted(unused)}; the template and render.py disagree")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The `#SBATCH` header: all N + M nodes, tasks per node, GPUs, time, USR1 signal, requeue, output."""
    lines = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes + spec.rollout_nodes}",
        f"--ntasks-per-node={spec.train_tasks_per_node}",
    ]
    if spec.gpus_per_node:
        lines += [f"--gpus-per-node={spec.gpus_per_node}", "--exclusive", "--mem=0"]
    lines += [
        f"--time={spec.time}",
        # B: = only the batch shell gets USR1; it forwards to the training step alone (see template).
        f"--signal=B:USR1@{spec.signal_before_s}",
        "--requeue",
        "--open-mode=append",  # restarts append to the same log
        f"--output={spec.run_dir}/logs/slurm-%j.out",
        f"--chdir={spec.workdir}",
    ]
    if spec.partition:
        lines.append(f"--partition={spec.partition}")
    if spec.account:
        lines.append(f"--account={spec.account}")
    lines += list(spec.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def env_lines(spec: JobSpec) -> list[str]:
    """Environment for the ranks: thread counts on CPU; NCCL knobs (documented, fabric-specific) on GPU."""
    if not spec.gpus_per_node:
        return ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # one thread per gloo rank"]
    return [
        "# NCCL over InfiniBand / RoCE: set these for your fabric (values are examples).",
        "# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3  # HCAs NCCL may use (`ibv_devinfo -l`); ^name excludes",
        "# export NCCL_SOCKET_IFNAME=ib0         # bootstrap/socket interface; never lo or docker0",
        "# export NCCL_IB_GID_INDEX=3            # RoCE v2: GID index of the routable address",
        "# export NCCL_NET_GDR_LEVEL=PHB         # how far GPUDirect RDMA may reach",
        "# export GLOO_SOCKET_IFNAME=ib0         # gloo (CPU-side collectives, checkpoint metadata)",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}   # INFO prints the transport per channel: check it says IB",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead peer aborts collectives instead of hanging them",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1    # ordered kernel launch for megatron TP comm overlap",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}",
    ]


def rollout_server_cmd(spec: JobSpec) -> str:
    """One server per rollout node: SGLang on GPUs, `megaent serve` (same HTTP protocol) on CPU, or the
    `slurm.rollout_server_cmd` template with {python}, {model} and {port} filled in.

    Both listen on every interface (the trainer is on other nodes), so both require the job's API key:
    SGLang through `--api-key`, `megaent serve` through $MEGAENT_API_KEY (kept off its command line)."""
    q = shlex.quote
    if spec.rollout_server_cmd:
        return fill_server_cmd(spec.rollout_server_cmd, {"python": spec.python, "model": q(spec.model_path),
                                                         "port": str(spec.rollout_port)})
    if spec.gpus_per_node:
        return (f"{spec.python} -m sglang.launch_server --model-path {q(spec.model_path)} --host 0.0.0.0 "
                f"--port {spec.rollout_port} --tp-size {spec.sglang_tp} "
                f"--dp-size {spec.gpus_per_node // spec.sglang_tp} --mem-fraction-static {spec.sglang_mem_fraction} "
                f"--api-key \"$MEGAENT_API_KEY\"")
    return (f"{spec.python} -m megaent.cli serve --model {q(spec.model_path)} --host 0.0.0.0 "
            f"--port {spec.rollout_port}")


def server_world(spec: JobSpec) -> str:
    """Environment that makes each rollout server a world of one on its own node's loopback.

    megaent.parallel.launch prefers RANK/WORLD_SIZE over Slurm's variables, so on CPU (where the server is `megaent
    serve`, one task per node) those are set too; SGLang on GPUs sets up its own process groups and gets only the
    rendezvous address (its use of RANK/WORLD_SIZE is not tested here)."""
    env = f"MASTER_ADDR=127.0.0.1 MASTER_PORT={spec.rollout_port + 1}"
    return env if spec.gpus_per_node else f"{env} RANK=0 WORLD_SIZE=1 LOCAL_RANK=0"


def rollout_block(spec: JobSpec) -> str:
    """Start the servers on the last M nodes, record their URLs, wait for health, build the overrides."""
    if not spec.rollout_nodes:
        return "# (no rollout nodes: the trainer uses the rollout engine named in its config)\n"
    gpus = f" --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node else ""
    m = spec.rollout_nodes
    return (
        f"# A fresh API key per job: the servers require it (they listen beyond loopback), srun hands it to the\n"
        f"# servers and the trainer through the environment (SGLangClient sends it as a Bearer token).\n"
        f"MEGAENT_API_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')\n"
        f"export MEGAENT_API_KEY\n"
        f"# Each server is a world of its own on its node: with the job's MASTER_ADDR/PORT and Slurm ranks, `megaent\n"
        f"# serve` would join the trainer's rendezvous on the first node (or the other servers') and wait for ever.\n"
        f"{server_world(spec)} \\\n"
        f"srun --nodes={m} --ntasks={m} --ntasks-per-node=1 --nodelist=\"$ROLLOUT_NODES\"{gpus} \\\n"
        f"     --output=\"$RUN_DIR/logs/%j-rollout-%N.log\" --open-mode=append \\\n"
        f"     {rollout_server_cmd(spec)} &\n"
        f"ROLLOUT_PID=$!\n"
        f"# Writes RUN_DIR/rollout_hosts.txt (one URL per line), waits for GET /health on each, prints the\n"
        f"# trainer overrides `rollout.engine=http` and `rollout.urls=[...]`.\n"
        f"HOSTS_OUT=$({spec.python} -m megaent.slurm.rollout_hosts --hosts \"$ROLLOUT_NODES\" "
        f"--port {spec.rollout_port} \\\n"
        f"     --out \"$RUN_DIR/rollout_hosts.txt\" --wait-s {spec.rollout_wait_s}) || {{\n"
        f"  echo \"[megaent.sbatch] rollout servers on $ROLLOUT_NODES not healthy; see $RUN_DIR/logs\"\n"
        f"  kill \"$ROLLOUT_PID\" 2>/dev/null; exit 1\n"
        f"}}\n"
        f"mapfile -t ROLLOUT_OVERRIDES <<< \"$HOSTS_OUT\"\n"
    )


def train_srun(spec: JobSpec) -> str:
    """The training step: all tasks of the first N nodes, per-rank logs, resume-by-rerun command."""
    q = shlex.quote
    gpus = f" --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node else ""
    args = [q(spec.config_path), q(f"trainer.run_dir={spec.run_dir}"), "trainer.quiet=true"]
    args += [q(o) for o in spec.overrides]
    # --kill-on-bad-exit=0: exit 3 is "bad" to Slurm, and ranks still writing their checkpoint shard must not
    # be killed when the first rank exits; --wait bounds the hang when a rank really crashes.
    return (
        f"srun --nodes={spec.nodes} --ntasks={spec.world_size} --ntasks-per-node={spec.train_tasks_per_node} "
        f"--nodelist=\"$TRAIN_NODES\"{gpus} \\\n"
        f"     --kill-on-bad-exit=0 --wait=600 --output=\"$RUN_DIR/logs/%j-%t.log\" --open-mode=append \\\n"
        f"     {spec.entrypoint or f'{spec.python} {TRAIN_MODULE}'} {' '.join(args)} \"${{ROLLOUT_OVERRIDES[@]}}\""
    )


def render_sbatch(spec: JobSpec, *, template: Optional[str] = None) -> str:
    """The complete sbatch script for `spec` (pure; `template` overrides the built-in skeleton)."""
    kind = f"{spec.gpus_per_node} GPUs" if spec.gpus_per_node else f"{spec.tasks_per_node} CPU tasks (gloo)"
    summary = (f"{spec.nodes} training node(s) x {kind} = world size {spec.world_size}; "
               f"{spec.rollout_nodes} rollout node(s)")
    setup = spec.setup.strip()
    values = {
        "summary": summary,
        "sbatch_lines": "\n".join(sbatch_lines(spec)),
        "run_dir": shlex.quote(spec.run_dir),
        "setup": f"# ---- setup (slurm.setup) ----\n{setup}\n" if setup else "",
        "train_nodes": str(spec.nodes),
        "first_rollout_node": str(spec.nodes + 1),
        "env_lines": "\n".join(env_lines(spec)),
        "rollout_block": rollout_block(spec),
        "train_srun": train_srun(spec),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
    }
    return fill(SBATCH_TEMPLATE if template is None else template, values)
