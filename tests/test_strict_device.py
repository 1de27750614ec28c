"""The device rule, checked without a GPU: `megaent train` under `strict_device.StrictDevice`.

On a GPU a tensor factory without `device=` makes a CPU tensor; on CPU nothing notices, because the policy's
device is the CPU too. `StrictDevice` records every factory called from megaent's own code without an
explicit device (host staging must say `device="cpu"`; module constructors are exempt, their parameters and
buffers move with `module.to(device)`). The engine itself refuses micro-batches that are not on the policy's
device (`tests/test_mcore_update.py`).

- the mode catches a factory without a device and lets explicit ones and module constructors through (a
  negative control: without it the trainer test could pass by recording nothing);
- `megaent train` (embedded rollout, update, checkpoint, resume) at one process and at TP=2 on 2 ranks
  records no violation. On the tree before the engine switch (cc90fce) the same run recorded 34 sites, among
  them the packed micro-batches of `trainer/batching.py` that were never moved to the policy's device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from strict_device import StrictDevice

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from strict_device import StrictDevice
from megaent.cli import main
mode = StrictDevice()
with mode:
    rc = main(sys.argv[1:])
print("STRICT_DEVICE " + json.dumps(mode.report()), flush=True)
sys.exit(rc)
"""
SMALL = ["rollout.n_samples=4", "rollout.max_new_tokens=6", "trainer.prompts_per_step=4",
         "trainer.mini_batch_size=2", "trainer.checkpoint_every=1", "trainer.quiet=true"]


def _made_here() -> torch.Tensor:
    return torch.zeros(3)


class _Mod(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("b", torch.ones(2))


def test_mode_catches_a_factory_without_device():
    mode = StrictDevice(package=HERE)
    with mode:
        _made_here()
        torch.zeros(3, device="cpu")
        torch.as_tensor(torch.ones(1, device="cpu"))  # an existing tensor keeps its device
        _Mod()
    report = mode.report()
    assert len(report) == 1 and "_made_here: torch.zeros without device=" in report[0], report


def _run(tmp_path: Path, argv: list[str], ranks: int) -> list[list[str]]:
    script = tmp_path / "strict_train.py"
    script.write_text(SCRIPT.format(tests=str(HERE)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    launch = [sys.executable, str(script)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(script)]
    out = subprocess.run([*launch, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reports = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()
               if line.startswith("STRICT_DEVICE ")]
    assert len(reports) == ranks, out.stdout[-2000:]
    return reports


@pytest.mark.slow
def test_train_and_resume_make_every_tensor_with_a_device(tmp_path):
    run = tmp_path / "run"
    base = ["train", "configs/demo.yaml", f"trainer.run_dir={run}", *SMALL]
    assert _run(tmp_path, [*base, "trainer.steps=2"], 1) == [[]]
    assert _run(tmp_path, ["train", "--resume", str(run), "trainer.steps=3"], 1) == [[]]


@pytest.mark.slow
def test_tp2_train_makes_every_tensor_with_a_device(tmp_path):
    argv = ["train", "configs/demo.yaml", f"trainer.run_dir={tmp_path / 'run'}", *SMALL, "trainer.steps=1",
            "parallel.tp=2"]
    assert _run(tmp_path, argv, 2) == [[], []]
