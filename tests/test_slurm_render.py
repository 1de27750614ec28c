"""The rendered sbatch script, executed by bash against stand-in `srun`/`scontrol`, and `megaent submit`.

What it compares against: the node split, world size, rendezvous address/port and requeue decisions are
computed independently in the tests (first N hosts train, last M serve, port 20000 + job id % 20000, requeue
only on exit 3 without TERM) and checked against what the real script does when bash runs it with fake
`srun` (records its argv and environment, then exits / waits for a signal like the trainer) and fake
`scontrol` (expands the node list, records `requeue`). The rollout-host helper runs for real (health check
patched to "up"); its HTTP health check is tested against a real local HTTP server. No Slurm needed.

    OMP_NUM_THREADS=1 python -m pytest tests/test_slurm_render.py -q
    python tests/test_slurm_render.py --write-example   # regenerate slurm/EXAMPLE_4x8_2rollout.sbatch
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megaent.config import load_config  # noqa: E402
from megaent.slurm import rollout_hosts  # noqa: E402
from megaent.slurm.render import JobSpec, SubmitError, job_spec, render_sbatch  # noqa: E402
from megaent.slurm.submit import main as submit_main  # noqa: E402

EXAMPLE = REPO / "slurm" / "EXAMPLE_4x8_2rollout.sbatch"
EXAMPLE_CONFIG = REPO / "configs" / "qwen2.5-7b-clip-cov.yaml"

FAKE_SRUN = r'''#!{python}
import json, os, signal, sys, time
argv = sys.argv[1:]
rec = {{"argv": argv, "env": {{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                                                          "MEGAENT_API_KEY")}}}}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"srun": rec}}) + "\n")
if any("launch_server" in a or a == "serve" for a in argv):
    sys.exit(0)  # a rollout server: started in the background, never waited for
mode = os.environ["FAKE_TRAIN"]
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
open(os.environ["FAKE_READY"], "w").close()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.02)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"train_got": got}}) + "\n")
sys.exit(3 if got else 1)  # the trainer's contract: checkpoint, then exit 3
'''

FAKE_SCONTROL = r'''#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\n' $FAKE_HOSTS; exit 0; fi
if [ "$1" = "requeue" ]; then echo "{{\"requeue\": \"$2\"}}" >> "$FAKE_LOG"; exit 0; fi
exit 1
'''

FAKE_PYTHON = r'''#!{python}
import sys
sys.path.insert(0, {repo!r})
if sys.argv[1:3] == ["-m", "megaent.slurm.rollout_hosts"]:
    from megaent.slurm import rollout_hosts
    rollout_hosts.is_healthy = lambda url, timeout_s=5.0: True  # the nodes are fictional
    sys.exit(rollout_hosts.main(sys.argv[3:]))
sys.exit("fake python: unexpected " + " ".join(sys.argv[1:]))
'''


def example_spec() -> JobSpec:
    """The README's example: Qwen2.5-7B Clip-Cov on 4 x 8 GPUs for training + 2 SGLang nodes."""
    cfg = load_config(EXAMPLE_CONFIG, ["slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.rollout_nodes=2",
                                       "slurm.partition=gpu", 'slurm.time="48:00:00"'])
    return job_spec(cfg, config_path="/path/to/megaent/configs/qwen2.5-7b-clip-cov.yaml",
                    run_dir="/scratch/megaent/runs/qwen2.5-7b-clip-cov", workdir="/path/to/megaent",
                    overrides=("trainer.steps=600",))


def sbatch_options(script: str) -> dict[str, str]:
    opts = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            opts[key] = value
    return opts


def fake_env(tmp_path: Path, *, hosts: list[str], job_id: int, train: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text.format(python=sys.executable, repo=str(REPO)))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "fake.log"), FAKE_HOSTS=" ".join(hosts),
               FAKE_READY=str(tmp_path / "ready"), FAKE_TRAIN=train, SLURM_JOB_ID=str(job_id),
               SLURM_JOB_NODELIST="fake[1-99]", SLURM_RESTART_COUNT="0")
    return env


def read_log(tmp_path: Path) -> list[dict]:
    path = tmp_path / "fake.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gpu_spec(tmp_path: Path, *, nodes: int, gpus: int, rollout: int) -> JobSpec:
    return JobSpec(config_path="/cfg/run.yaml", run_dir=str(tmp_path / "run"), workdir=str(tmp_path),
                   nodes=nodes, gpus_per_node=gpus, rollout_nodes=rollout, model_path="/models/m", python="python",
                   overrides=("optimizer.lr=1e-6", "data.path=/d/a b.jsonl"), rollout_port=31000, sglang_tp=2)


def test_4x8_with_2_rollout_nodes_header_and_rendezvous(tmp_path: Path) -> None:
    nodes, gpus, rollout, job_id = 4, 8, 2, 54321
    spec = gpu_spec(tmp_path, nodes=nodes, gpus=gpus, rollout=rollout)
    script = render_sbatch(spec)
    opts = sbatch_options(script)
    assert opts["--nodes"] == str(nodes + rollout)
    assert opts["--ntasks-per-node"] == str(gpus) and opts["--gpus-per-node"] == str(gpus)
    assert opts["--signal"] == f"B:USR1@{spec.signal_before_s}"
    assert "--requeue" in opts and opts["--open-mode"] == "append"
    assert opts["--output"] == f"{spec.run_dir}/logs/slurm-%j.out"

    hosts = [f"gpu{i:03d}" for i in range(1, nodes + rollout + 1)]
    (tmp_path / "job.sh").write_text(script)
    env = fake_env(tmp_path, hosts=hosts, job_id=job_id, train="exit:0")
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sruns = [r["srun"] for r in read_log(tmp_path) if "srun" in r]
    assert len(sruns) == 2 and not any("requeue" in r for r in read_log(tmp_path))
    serve, train = sruns
    # The last `rollout` hosts run one SGLang server each, with all GPUs of their node (dp = gpus / tp).
    assert f"--nodelist={','.join(hosts[nodes:])}" in serve["argv"]
    assert f"--nodes={rollout}" in serve["argv"] and "--ntasks-per-node=1" in serve["argv"]
    assert serve["argv"][serve["argv"].index("--tp-size") + 1] == "2"
    assert serve["argv"][serve["argv"].index("--dp-size") + 1] == str(gpus // 2)
    # The first `nodes` hosts train, one task per GPU; everyone meets at the first host.
    assert f"--nodelist={','.join(hosts[:nodes])}" in train["argv"]
    assert f"--ntasks={nodes * gpus}" in train["argv"] and f"--ntasks-per-node={gpus}" in train["argv"]
    assert train["env"]["MASTER_ADDR"] == hosts[0]
    assert train["env"]["MASTER_PORT"] == str(20000 + job_id % 20000)
    cmd = train["argv"][train["argv"].index("megaent.cli") - 2:]
    urls = [f"http://{h}:31000" for h in hosts[nodes:]]
    assert cmd == ["python", "-m", "megaent.cli", "train", "/cfg/run.yaml", f"trainer.run_dir={spec.run_dir}",
                   "trainer.quiet=true", "optimizer.lr=1e-6", "data.path=/d/a b.jsonl", "rollout.engine=http",
                   f"rollout.urls=[{','.join(urls)}]"]
    assert (Path(spec.run_dir) / "rollout_hosts.txt").read_text().split() == urls
    # The overrides the trainer receives are valid for the real config loader.
    cfg = load_config(None, cmd[-2:])
    assert cfg.rollout.engine == "http" and cfg.rollout.urls == urls


@pytest.mark.parametrize("gpus", [8, 0])
def test_rollout_servers_and_trainer_share_a_fresh_api_key(tmp_path: Path, gpus: int) -> None:
    """Issue 21 point 6: the servers listen on 0.0.0.0, so the script generates a key per job and hands it to the
    servers (SGLang: --api-key; megaent serve: $MEGAENT_API_KEY) and to the trainer's client (environment)."""
    spec = JobSpec(config_path="/c.yaml", run_dir=str(tmp_path / "run"), workdir=str(tmp_path), nodes=1,
                   gpus_per_node=gpus, tasks_per_node=0 if gpus else 2, rollout_nodes=1, model_path="/models/m")
    script = render_sbatch(spec)
    (tmp_path / "job.sh").write_text(script)
    env = fake_env(tmp_path, hosts=["n1", "n2"], job_id=5, train="exit:0")
    env.pop("MEGAENT_API_KEY", None)
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    serve, train = [r["srun"] for r in read_log(tmp_path) if "srun" in r]
    key = serve["env"]["MEGAENT_API_KEY"]
    assert key and len(key) == 64 and int(key, 16) >= 0, key
    assert train["env"]["MEGAENT_API_KEY"] == key and key not in script and key not in proc.stdout
    argv = serve["argv"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    if gpus:
        assert argv[argv.index("--api-key") + 1] == key
    else:  # the real `megaent serve` parser takes this line and, with the key in the environment, may bind 0.0.0.0
        from megaent.cli import build_parser, is_loopback
        from megaent.rollout.server import build_parser as serve_parser

        tail = argv[argv.index("serve") + 1:]
        for a in (build_parser().parse_args(["serve", *tail]), serve_parser().parse_args(tail)):
            assert a.model == "/models/m" and not is_loopback(a.host) and a.api_key is None
    # Two jobs never share a key.
    subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    keys = {r["srun"]["env"]["MEGAENT_API_KEY"] for r in read_log(tmp_path) if "srun" in r}
    assert len(keys) == 2


@pytest.mark.parametrize("train_rc, requeued, script_rc", [(3, True, 0), (1, False, 1), (0, False, 0)])
def test_requeue_only_on_exit_3(tmp_path: Path, train_rc: int, requeued: bool, script_rc: int) -> None:
    spec = JobSpec(config_path="/c.yaml", run_dir=str(tmp_path / "run"), workdir=str(tmp_path), nodes=1,
                   gpus_per_node=0, tasks_per_node=2)
    (tmp_path / "job.sh").write_text(render_sbatch(spec))
    env = fake_env(tmp_path, hosts=["cpu1"], job_id=7, train=f"exit:{train_rc}")
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == script_rc, proc.stdout + proc.stderr
    log = read_log(tmp_path)
    assert any(r.get("requeue") == "7" for r in log) == requeued
    train = log[0]["srun"]["argv"]
    assert "--ntasks=2" in train and "--gpus-per-node" not in " ".join(train)


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_batch_signal_reaches_the_training_step(tmp_path: Path, sig: int, requeued: bool) -> None:
    """USR1 to the batch shell (what `--signal=B:USR1@N` and `scancel --batch` do) is forwarded to the training
    srun while the shell waits; the trainer exits 3 and the job requeues. TERM (scancel) is forwarded but never
    requeues."""
    spec = JobSpec(config_path="/c.yaml", run_dir=str(tmp_path / "run"), workdir=str(tmp_path), nodes=2,
                   gpus_per_node=4, rollout_nodes=0)
    (tmp_path / "job.sh").write_text(render_sbatch(spec))
    env = fake_env(tmp_path, hosts=["a1", "a2"], job_id=99, train="wait")
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "ready").exists(), "fake training step never started"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    log = read_log(tmp_path)
    got = [r["train_got"] for r in log if "train_got" in r]
    assert got == [[signal.Signals(sig).name[3:]]], out
    assert any(r.get("requeue") == "99" for r in log) == requeued, out
    assert proc.returncode == (0 if requeued else 3), out
    assert "trainer exited with 3" in out


def test_submit_dry_run_cli_flags_override_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("slurm:\n  nodes: 2\n  gpus_per_node: 8\n  partition: big\n")
    rc = submit_main([str(cfg), "optimizer.lr=2e-6", "--nodes", "3", "--time", "1:00:00", "--run-dir",
                      str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    opts = sbatch_options(out)
    assert opts["--nodes"] == "3" and opts["--partition"] == "big" and opts["--time"] == "1:00:00"
    assert opts["--ntasks-per-node"] == "8"
    expected = render_sbatch(job_spec(load_config(cfg, ["slurm.nodes=3", 'slurm.time="1:00:00"']),
                                      config_path=str(cfg), run_dir=str(tmp_path / "r"), workdir=os.getcwd(),
                                      overrides=("optimizer.lr=2e-6",)))
    assert out == expected


def test_submit_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  steps: 2\n")
    run = ["--run-dir", str(tmp_path / "r")]
    # CPU job without a task count; rollout nodes without a model; typo in a key.
    assert submit_main([str(cfg), "--gpus-per-node", "0", "--dry-run", *run]) == 2
    assert "--tasks-per-node" in capsys.readouterr().err
    assert submit_main([str(cfg), "--rollout-nodes", "1", "--dry-run", *run]) == 2
    assert "model.path" in capsys.readouterr().err
    assert submit_main([str(cfg), "optimizer.lrr=1", "--dry-run", *run]) == 2
    assert "optimizer.lr" in capsys.readouterr().err
    assert submit_main([str(cfg), "--time", "tomorrow", "--dry-run", *run]) == 2
    assert "slurm.time" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text("slurm:\n  time: 24:00:00\n")  # unquoted: YAML makes it 86400
    assert submit_main([str(tmp_path / "t.yaml"), "--dry-run", *run]) == 2
    assert "quote it" in capsys.readouterr().err
    # No sbatch on PATH: a clear error, exit 2, but the script is already in the run directory.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert submit_main([str(cfg), "--gpus-per-node", "0", "--tasks-per-node", "2", *run]) == 2
    assert "sbatch" in capsys.readouterr().err
    assert (tmp_path / "r" / "train.sbatch").read_text().startswith("#!/bin/bash")
    with pytest.raises(SubmitError, match="world size"):
        job_spec(load_config(None, ["parallel.tp=3"]), config_path="/c", run_dir="/r", workdir="/w")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_rollout_hosts_waits_for_real_health_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        out = tmp_path / "hosts.txt"
        assert rollout_hosts.main(["--hosts", "127.0.0.1,localhost", "--port", str(port), "--out", str(out),
                                   "--wait-s", "10"]) == 0
        urls = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
        assert out.read_text().split() == urls
        assert capsys.readouterr().out.split("\n")[:2] == ["rollout.engine=http", f"rollout.urls=[{','.join(urls)}]"]
    finally:
        server.shutdown()
        server.server_close()
    # The port is closed now: nothing healthy, exit 1 after the wait.
    t0 = time.monotonic()
    assert rollout_hosts.wait_healthy([f"http://127.0.0.1:{port}"], wait_s=0.5, poll_s=0.1) == [
        f"http://127.0.0.1:{port}"]
    assert time.monotonic() - t0 < 10


def test_example_file_is_current() -> None:
    """slurm/EXAMPLE_4x8_2rollout.sbatch is what render_sbatch makes of the README example today."""
    assert EXAMPLE.exists(), "run: python tests/test_slurm_render.py --write-example"
    assert EXAMPLE.read_text() == render_sbatch(example_spec()), \
        "stale example; run: python tests/test_slurm_render.py --write-example"


if __name__ == "__main__" and "--write-example" in sys.argv:
    EXAMPLE.write_text(render_sbatch(example_spec()))
    print(EXAMPLE)
