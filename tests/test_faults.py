"""Fault injection for issue 21: each test plants one fault an operator meets (a damaged or hostile file, a
diverging run, a signal at the wrong moment, a kill -9, a full disk, a stuck or crashing verifier, a bad config)
and checks that megaent refuses, recovers or reports it. Every test failed on the code before the fix (the
comment under each says how); the references are hand-written expectations and, for kill -9, an uninterrupted
run of the same config.
Run: pytest tests/test_faults.py            (the fast ones, ~1 min)
     pytest tests/test_faults.py -m slow    (CLI runs: divergence, signals, torchrun, 20 x kill -9; ~3-4 min)
"""
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from megaent.config import ConfigError, load_config, to_yaml
from megaent.rewards.pool import RewardPool
from megaent.trainer.checkpoint import latest_checkpoint, load_checkpoint, load_latest, save_checkpoint
from megaent.trainer.integrity import CheckpointError
from megaent.trainer.metrics import MetricsSink
from megaent.trainer.run import resume_config

ROOT = Path(__file__).resolve().parents[1]


def _save(run, step, scale=1.0, cfg=None):
    tensors = {"w": torch.full((64, 8), scale), "b": torch.arange(8.0) * scale}
    meta = {"data": {"index": step}, "layout": {"tp": 1, "pp": 1, "dp": 1}}
    if cfg is not None:
        meta["config"] = to_yaml(cfg)
    return save_checkpoint(run, step, tensors, meta, keep_last=5)


def _blank():
    return {"w": torch.zeros(64, 8), "b": torch.zeros(8)}


# ---------------------------------------------------------------- 1: config.yaml on resume
def test_1_empty_config_resumes_with_the_checkpoint_copy(tmp_path, caplog):
    # Before: an empty RUN/config.yaml was accepted and the run resumed on the schema defaults (steps=100, ...).
    run = tmp_path / "run"
    cfg = load_config(None, ["trainer.steps=7", "optimizer.lr=3e-4", f"trainer.run_dir={run}"])
    _save(run, 2, cfg=cfg)
    assert (run / "config.yaml").read_text() == to_yaml(cfg)  # the run's file follows its checkpoint
    (run / "config.yaml").write_text("")
    with caplog.at_level(logging.WARNING):
        got = resume_config(str(run))
    assert got == cfg and "resuming with the copy" in caplog.text
    assert (run / "config.yaml").read_text() == to_yaml(cfg)  # repaired
    (run / "config.yaml").write_text("trainer: [unclosed")  # garbled: the same fallback
    assert resume_config(str(run)) == cfg
    with pytest.raises(ConfigError, match="the file is empty"):
        (tmp_path / "e.yaml").write_text("")
        load_config(tmp_path / "e.yaml")


def test_1_edited_config_differs_from_the_checkpoint_copy(tmp_path):
    # Before: nothing compared the two; an edited file silently changed a resumed run.
    run = tmp_path / "run"
    cfg = load_config(None, ["trainer.steps=7", f"trainer.run_dir={run}"])
    _save(run, 2, cfg=cfg)
    (run / "config.yaml").write_text(to_yaml(cfg).replace("steps: 7", "steps: 9"))
    with pytest.raises(ConfigError, match=r"differs from the config its checkpoint carries .* at trainer\.steps"):
        resume_config(str(run))
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert resume_config(str(run), overrides=["trainer.steps=9"]).trainer.steps == 9  # the way to change it


# ---------------------------------------------------------------- 2: nothing in a checkpoint is unpickled
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_2_planted_metadata_payload_is_refused(tmp_path):
    # Before: dcp.load unpickled .metadata, so this ran `touch`.
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="not part of DCP's metadata"):
        load_checkpoint(path, _blank(), verify_digests=False)
    assert not marker.exists()


def test_2_planted_rng_pickle_is_not_loaded(tmp_path, caplog):
    # Before: rng_rank0.pt was read with torch.load(weights_only=False), which ran `touch`.
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    (path / "rng_rank0.safetensors").unlink()
    torch.save({"torch": _RunsCode(marker)}, path / "rng_rank0.pt")
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, _blank(), verify_digests=False)
    assert not marker.exists() and "old pickled format" in caplog.text


def test_2_bytes_entry_for_a_tensor_key_is_refused(tmp_path):
    # DCP reads a bytes entry with torch.load(weights_only=False): a metadata that declares our tensor as bytes
    # would unpickle whatever the shard holds there. Before: nothing checked the entry kinds.
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megaent.trainer.integrity import read_metadata

    path = _save(tmp_path, 1)
    md = read_metadata(path)
    md.state_dict_metadata["w"] = BytesStorageMetadata()
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="pickled bytes where a tensor belongs"):
        load_checkpoint(path, _blank(), verify_digests=False)


def test_2_rng_state_round_trips_as_tensors(tmp_path):
    import random

    import numpy as np

    path = _save(tmp_path, 1)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    load_checkpoint(path, _blank())
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


# ---------------------------------------------------------------- 5: digests
def test_5_bit_rot_is_caught_and_the_flag_skips_the_check(tmp_path):
    # Before: a flipped bit inside a tensor loaded silently.
    path = _save(tmp_path, 1, scale=2.0)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor payload
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp does not match its SHA-256 digest"):
        load_checkpoint(path, _blank())
    out = _blank()
    load_checkpoint(path, out, verify_digests=False)  # trainer.verify_checkpoints=false: no hashing
    assert not torch.equal(out["w"], torch.full((64, 8), 2.0))  # the damage is really in the tensor
    digests = json.loads((path / "digests.json").read_text())
    assert {"__0_0.distcp", ".metadata", "rng_rank0.safetensors", "meta.json"} <= set(digests)


# ---------------------------------------------------------------- 13: fallback, full disk
def test_13_damaged_newest_falls_back_to_the_newest_intact(tmp_path, caplog):
    # Before: the newest complete checkpoint was loaded whatever its state (a traceback, or bad weights).
    for step in (1, 2, 3):
        _save(tmp_path, step, scale=float(step))
    (tmp_path / "checkpoints" / "step_000003" / "__0_0.distcp").write_bytes(b"rot")
    (tmp_path / "checkpoints" / "step_000002" / "meta.json").write_text("{")
    out = _blank()
    with caplog.at_level(logging.WARNING):
        path, meta = load_latest(tmp_path, out, layout={"tp": 1, "pp": 1, "dp": 1})
    assert path.name == "step_000001" and meta["step"] == 1 and torch.equal(out["w"], torch.full((64, 8), 1.0))
    assert "step_000003 cannot be used" in caplog.text and "falling back" in caplog.text
    (tmp_path / "checkpoints" / "step_000001" / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_latest(tmp_path, _blank())


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from megaent.trainer.checkpoint import save_checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        save_checkpoint(sys.argv[1], 1, {"w": torch.randn(1000, 1000)}, {})
    except Exception as exc:
        print(type(exc).__name__, exc)
""")


def test_13_full_disk_is_a_clear_error_and_leaves_no_temp_dir(tmp_path):
    # Before: torch's "unexpected pos 704 vs 598" traceback, and .tmp-step_000001 kept the space.
    p = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.stdout.startswith("CheckpointError"), p.stdout + p.stderr[-2000:]
    assert "the disk is full" in p.stdout and "partial directory was removed" in p.stdout
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------- 7: signals
_SIGNALS = textwrap.dedent("""
    import os, signal, sys, time
    from megaent.trainer.signals import StopFlag, record_early
    record_early()                             # what `megaent train` does first
    os.kill(os.getpid(), signal.SIGTERM)       # during the slow imports, before the trainer's handler
    stop = StopFlag().install()
    assert stop.signum == signal.SIGTERM, stop.signum
    stop.uninstall()                           # shutdown: the trainer and run.train uninstall
    os.kill(os.getpid(), signal.SIGUSR1)       # a second signal while tearing down
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    sys.exit(3)
""")


def test_7_early_and_repeated_signals_keep_exit_code_3():
    # Before: there was no early recorder, and uninstall restored SIG_DFL: exit -15 instead of 3.
    p = subprocess.run([sys.executable, "-c", _SIGNALS], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])


# ---------------------------------------------------------------- 9: metrics never hold a step twice
def test_9_sink_drops_rows_past_the_resumed_step(tmp_path):
    # Before: a kill before the first checkpoint left rows 1-2 in place and the rerun appended 1-2 again.
    rows = [json.dumps({"step": s, "x": s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "x"')  # a cut last line
    (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 1, "r": 0}) + "\n")
    sink = MetricsSink(tmp_path, enabled=True, start_step=0)
    sink.log(1, {"x": 1.0})
    sink.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "samples.jsonl").read_text() == ""
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    MetricsSink(tmp_path, enabled=True, start_step=2).close()  # resumed from step 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------- 10: verifier deadline, errors, crashes, memory
def _sleepy(response, answer, fmt):
    time.sleep(60)
    return 1.0, True


def _raises(response, answer, fmt):
    raise ZeroDivisionError("verifier bug")


def _dies(response, answer, fmt):
    if response == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0, True


def _hungry(response, answer, fmt):
    block = bytearray(2 * 2**30)  # 2 GiB, past a 1 GiB cap
    return float(len(block) > 0), True


def test_10_workers_0_still_has_a_deadline():
    # Before: workers=0 scored in-process with no deadline: this call slept 60 s.
    with RewardPool(workers=0, timeout_s=1.0, scorer=_sleepy) as pool:
        t0 = time.monotonic()
        res = pool.score(["a"], ["a"])
        assert res.timeouts == 1 and time.monotonic() - t0 < 30  # deadline + one worker start on a busy CPU
    with RewardPool("synthetic", workers=0) as pool:  # the exact checker cannot hang: stays in-process
        assert pool._workers == [] and pool.score(["3"], ["3"]).rewards == [1.0]


def test_10_errors_crashes_and_timeouts_are_metrics():
    # Before: an in-process verifier error propagated; a worker death counted as an error; no crash metric.
    with RewardPool("synthetic", workers=0, scorer=None) as pool:
        pool._scorer = _raises  # an in-process verifier with a bug
        assert pool.score(["1"], ["1"]).errors == 1
    with RewardPool(workers=1, timeout_s=20.0, scorer=_dies) as pool:
        res = pool.score(["ok", "die", "ok"], ["a", "a", "a"])
        assert res.rewards == [1.0, 0.0, 1.0] and res.crashes == 1 and res.errors == 0
        assert pool.take_metrics() == {"reward/verifier_timeouts": 0.0, "reward/verifier_errors": 0.0,
                                       "reward/verifier_crashes": 1.0}
        assert pool.take_metrics()["reward/verifier_crashes"] == 0.0  # reset per step


def test_10_worker_memory_is_capped():
    # Before: no cap, the 2 GiB allocation succeeded (reward 1).
    with RewardPool(workers=1, timeout_s=30.0, scorer=_hungry, memory_gib=1.0) as pool:
        res = pool.score(["x"], ["x"])
        assert res.rewards == [0.0] and res.errors == 1


# ---------------------------------------------------------------- 11: interpolations stay unresolved
def test_11_saved_config_keeps_env_interpolations(tmp_path, monkeypatch):
    # Before: to_yaml wrote the resolved value, the secret in clear.
    monkeypatch.setenv("MEGAENT_TEST_SECRET", "hunter2")
    y = tmp_path / "c.yaml"
    y.write_text("trainer:\n  wandb_project: ${oc.env:MEGAENT_TEST_SECRET}\n  steps: ${oc.env:MEGAENT_NOPE,5}\n")
    cfg = load_config(y, ["trainer.run_dir=runs/${oc.env:MEGAENT_TEST_SECRET}"])
    assert (cfg.trainer.wandb_project, cfg.trainer.steps, cfg.trainer.run_dir) == ("hunter2", 5, "runs/hunter2")
    text = to_yaml(cfg)
    assert "hunter2" not in text and "${oc.env:MEGAENT_TEST_SECRET}" in text and "${oc.env:MEGAENT_NOPE,5}" in text
    (tmp_path / "saved.yaml").write_text(text)
    assert load_config(tmp_path / "saved.yaml") == cfg  # resolves again on load


# ---------------------------------------------------------------- 4, 12: config values
@pytest.mark.parametrize("override,needle", [
    ("optimizer.lr=inf", "optimizer.lr=inf: must be a finite number"),
    ("optimizer.eps=nan", "optimizer.eps=nan: must be a finite number"),
    ("reward.timeout_s=-1", "reward.timeout_s=-1.0: must be > 0"),
    ("data.max_prompt_len=-5", "data.max_prompt_len=-5: must be >= 1"),
    ("rollout.top_k=0", "rollout.top_k=0: must be -1 (off) or >= 1"),
])
def test_4_12_bad_values_are_config_errors(override, needle):
    # Before: each was accepted (the full table over every key is tests/test_config.py::test_every_key_has_a_check).
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------- CLI runs (slow)
SMALL = ["rollout.n_samples=4", "rollout.max_new_tokens=4", "trainer.prompts_per_step=4",
         "trainer.mini_batch_size=2", "trainer.ppo_epochs=1", "trainer.quiet=true", "trainer.dynamics_every=0"]
VOLATILE = ("time/", "tokens_per_s")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


def _train(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megaent.cli", "train", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _rows(run):
    path = Path(run) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.slow
def test_12_layout_and_size_errors_exit_2_with_one_line(tmp_path):
    # Before: tp=3 on the demo's 4 heads was a traceback deep in model building, exit 1.
    for args, needle in ((["parallel.tp=3"], "parallel.tp=3"), (["data.max_prompt_len=-1"], "data.max_prompt_len")):
        p = _train("configs/demo.yaml", *args, f"trainer.run_dir={tmp_path / 'r'}", timeout=300)
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]


@pytest.mark.slow
def test_4_divergence_stops_before_saving(tmp_path):
    # Before: lr=1e30 blew the weights up, the run exited 0 and wrote NaN checkpoints and a NaN hf_final.
    run = tmp_path / "run"
    p = _train("configs/demo.yaml", *SMALL, "trainer.steps=4", "trainer.checkpoint_every=1", "optimizer.lr=1e30",
               "optimizer.grad_clip=0", f"trainer.run_dir={run}")
    assert p.returncode == 4, p.stderr[-3000:]
    assert "training diverged" in p.stderr and "stopped before writing a checkpoint" in p.stderr
    assert not (run / "hf_final").exists()
    bad = _rows(run)[-1]["step"]
    assert latest_checkpoint(run) is None or int(latest_checkpoint(run).name[5:]) < bad
    from megaent.trainer.integrity import read_metadata

    for ckpt in (run / "checkpoints").glob("step_*"):  # what was saved is finite
        md = read_metadata(ckpt)
        out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
        load_checkpoint(ckpt, out, restore_rng=False)
        assert all(torch.isfinite(t).all() for t in out.values()), ckpt


@pytest.mark.slow
def test_7_term_during_startup_checkpoints_and_exits_3(tmp_path):
    # Before: a TERM during the imports killed the process (exit -15) and nothing was saved.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megaent.cli", "train", "configs/demo.yaml", *SMALL,
                             "trainer.steps=50", f"trainer.run_dir={run}"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside the torch / megatron-core imports
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # and a repeat
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert latest_checkpoint(run) is not None and len(_rows(run)) == 1


@pytest.mark.slow
def test_14_torchrun_exits_3_when_every_rank_checkpointed(tmp_path):
    # Before: torchrun exited 1 on TERM although both ranks wrote their checkpoint and exited 3.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megaent.trainer.torchrun", "--standalone", "--nproc-per-node=2",
                             "-m", "megaent.cli", "train", "configs/demo.yaml", *SMALL, "trainer.steps=200",
                             "trainer.checkpoint_every=0", f"trainer.run_dir={run}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(_rows(run)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert latest_checkpoint(run) is not None


# ---------------------------------------------------------------- 9, acceptance: 20 x kill -9
class _ForkServer:
    """`megaent train` runs forked from one pre-imported process (tests/fork_server.py)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fork_server.py")], cwd=ROOT, env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv, log):
        return self._ask(f"run {json.dumps(argv)} {log}")

    def wait(self, pid):
        return self._ask(f"wait {pid}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _complete_steps(run):
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()) \
        if (run / "checkpoints").is_dir() else []


def _wait_for(cond, what, deadline_s=120.0):
    deadline = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.mark.slow
def test_20_kill9_and_resumes_equal_an_uninterrupted_run(tmp_path):
    """20 kill -9s: 3 before the first checkpoint completes, then mid-step or mid-save at random; every restart
    is `megaent train --resume RUN`. Before: the kills before the first checkpoint left duplicate rows."""
    import random

    steps = 20
    base = ["train", "configs/demo.yaml", *SMALL, f"trainer.steps={steps}", "trainer.checkpoint_every=1"]
    server = _ForkServer()
    t0 = time.monotonic()
    try:
        ref = tmp_path / "ref"
        assert server.wait(server.start([*base, f"trainer.run_dir={ref}"], str(tmp_path / "ref.log"))) == 0, \
            (tmp_path / "ref.log").read_text()[-3000:]
        t_ref = time.monotonic() - t0
        run, log = tmp_path / "run", str(tmp_path / "run.log")
        rng = random.Random(21)
        kinds = ["before_first_save"] * 3 + [rng.choice(["mid_step", "mid_save"]) for _ in range(17)]
        done, counts = False, {}
        for i, kind in enumerate(kinds):
            pid = server.start([*base, f"trainer.run_dir={run}"] if i == 0 else ["train", "--resume", str(run)], log)
            had = _complete_steps(run)
            if kind == "before_first_save":
                assert not had
                _wait_for(lambda: _rows(run) or not os.path.exists(f"/proc/{pid}"), "the first metrics row")
                time.sleep(rng.uniform(0, 0.05))
            elif kind == "mid_save":
                _wait_for(lambda: any((run / "checkpoints").glob(".tmp-step_*")) or not os.path.exists(f"/proc/{pid}"),
                          "a checkpoint being written")
            else:
                _wait_for(lambda: _complete_steps(run)[-1:] > had[-1:] or not os.path.exists(f"/proc/{pid}"),
                          "one more checkpoint")
                time.sleep(rng.uniform(0, 0.2))
            os.kill(pid, signal.SIGKILL)
            code = server.wait(pid)
            if code == 0:  # it finished before the kill landed
                done = True
                break
            assert code == -signal.SIGKILL, (kind, code, Path(log).read_text()[-3000:])
            counts[kind] = counts.get(kind, 0) + 1
        if not done:
            assert server.wait(server.start(["train", "--resume", str(run)], log)) == 0, Path(log).read_text()[-3000:]
        took = time.monotonic() - t0
    finally:
        server.close()
    got, want = _rows(run), _rows(ref)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no step twice, none missing
    assert got == want  # bitwise equal to the uninterrupted run
    assert sum(counts.values()) == 20, counts
    print(json.dumps({"kills": counts, "seconds": round(took, 1), "reference_run_s": round(t_ref, 1)}))
