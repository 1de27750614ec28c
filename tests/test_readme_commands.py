"""Every `megaent ...` line that README.md's ```bash blocks or a verb's `--help` shows, run as typed.

Compared against: the documented outcome (exit 0; exit 2 with a message for the usage errors listed in
USAGE_ERRORS; for `megaent plan` of a layout that does not fit, exit 1 with the smallest change that fits). Each command runs through the installed console script (`shutil.which("megaent")`) under
`bash -o pipefail` in a tmp dir that holds `configs/` and tiny fixtures; the placeholders below are the only
rewrites. Lines that need a trained run (train, resume, fit-law, plot, eval on a run) are `slow`: a module
fixture trains one run with the README's documented dotted-override form and copies it to each path a
command names. `megaent serve` lines start the server, GET /health, and stop it.

    OMP_NUM_THREADS=1 timeout 900 python -m pytest -q tests/test_readme_commands.py            # fast lines
    OMP_NUM_THREADS=1 timeout 900 python -m pytest -q -m slow tests/test_readme_commands.py    # run lines
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("train", "serve", "convert", "submit", "eval", "fit-law", "plot", "plan")

# placeholder -> what the test puts there (paths relative to the tmp dir)
PLACEHOLDERS = {
    "HF_DIR": "hf_tiny",            # a tiny random Qwen2 checkpoint with tokenizer (tests/hf_tiny.py)
    "OUT_DIR": "out_megaent",       # a fresh output directory
    "CONFIG": "configs/demo.yaml",
    "RUN_DIR": "runs/try",
}
# run-directory paths the examples name; each is a copy of the fixture's trained run
RUN_PATHS = ("runs/try", "runs/demo/grpo_seed0", "runs/demo/grpo_seed1", "runs/demo-20261125-120000")
# documented usage errors: a command fragment -> the words its one-line message must contain (exit 2)
USAGE_ERRORS = {"--tp 2 --pp 2": "torchrun"}
# lines that fail today for a bug outside this test's reach: run, and expected to fail until fixed (strict)
# verb prefix -> (the error text that marks this bug, the bug); any other failure still fails the test
KNOWN_BROKEN: dict[str, tuple[str, str]] = {}  # command prefix -> (stderr text, why); empty: all work
# the README's "dotted overrides" form, appended to train lines so the run takes seconds
SMALL = ["rollout.n_samples=4", "rollout.max_new_tokens=4", "trainer.prompts_per_step=4", "trainer.mini_batch_size=2",
         "trainer.ppo_epochs=1", "trainer.quiet=true", "trainer.steps=4", "trainer.checkpoint_every=2"]


def _command_part(line: str) -> str:
    """The command of an example line: before a `#` comment or a run of 2+ spaces (a description column)."""
    return re.split(r"\s{2,}|\s#", line.strip(), maxsplit=1)[0].strip()


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        out += [_command_part(ln) for ln in block.splitlines() if ln.strip().startswith("megaent ")]
    return out


def help_commands() -> list[str]:
    """Example lines of each verb's --help; synopsis lines (with `[...]` or bare N/G) are not commands."""
    exe = shutil.which("megaent")
    out = []
    for verb in VERBS:
        text = subprocess.run([exe, verb, "--help"], capture_output=True, text=True, timeout=60).stdout
        for ln in text.splitlines():
            cmd = _command_part(ln)
            if cmd.startswith("megaent ") and "[" not in cmd and not re.search(r"\s[NG]\b", cmd):
                out.append(cmd)
    return out


def _substitute(cmd: str, port: int) -> str:
    for k, v in PLACEHOLDERS.items():
        cmd = re.sub(rf"\b{k}\b", v, cmd)
    return re.sub(r"--port \d+", f"--port {port}", cmd)


def _needs_run(cmd: str) -> bool:
    cmd = _substitute(cmd, 0)
    verb = cmd.split()[1]
    return verb in ("fit-law", "plot") or (verb == "train" and "--help-config" not in cmd) or \
        (verb == "eval" and "runs/" in cmd) or (verb == "convert" and "runs/" in cmd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", d / "configs")
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_tiny import make_tiny_hf
    make_tiny_hf(d / PLACEHOLDERS["HF_DIR"], "qwen2", layers=2, hidden=32)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(8)]  # 64: eval's batch
    (d / "prompts.jsonl").write_text("".join(f'{{"prompt": "{r["prompt"]}", "answer": "{r["answer"]}"}}\n'
                                             for r in rows))
    return d


@pytest.fixture(scope="module")
def trained(workdir) -> Path:
    """One tiny run, trained by the help's own first train line plus SMALL, copied to every RUN_PATHS entry."""
    exe = shutil.which("megaent")
    p = subprocess.run([exe, "train", "configs/demo.yaml", *SMALL, "trainer.run_dir=runs/fixture"], cwd=workdir,
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for rel in RUN_PATHS:
        shutil.copytree(workdir / "runs/fixture", workdir / rel, dirs_exist_ok=True)
    return workdir


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("megaent")
    assert exe, "megaent console script not installed: python -m pip install -e ."
    line = re.sub(r"^megaent\b", exe, cmd)
    return subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=900)


def _serve(cmd: str, cwd: Path, port: int) -> None:
    exe = shutil.which("megaent")
    argv = [exe, *cmd.split()[1:]]
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"{cmd}: exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    return
            except OSError:
                assert time.monotonic() < deadline, f"{cmd}: /health not up in 180 s"
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check(cmd: str, cwd: Path) -> None:
    port = _free_port()
    typed = _substitute(cmd, port)
    if typed.split()[1] == "serve":
        return _serve(typed, cwd, port)
    if typed.split()[1] == "train" and "--help-config" not in typed:
        typed += " " + " ".join(o for o in SMALL if "--resume" not in typed or not o.startswith("trainer.steps"))
        if "--resume" in typed:
            typed += " trainer.steps=6"
    p = _run(typed, cwd)
    broken = [v for k, v in KNOWN_BROKEN.items() if cmd.startswith(k)]
    if broken:
        assert p.returncode != 0, f"{typed} works now: drop it from KNOWN_BROKEN"
        assert broken[0][0] in p.stderr, f"{typed}: exit {p.returncode}\n{p.stderr[-3000:]}"
        pytest.xfail(broken[0][1])
    if typed.split()[1] == "plan" and p.returncode == 1:  # documented: exit 1 and the smallest change that fits
        assert "does NOT fit" in p.stdout and "smallest change that fits" in p.stdout, (typed, p.stdout)
        return
    for frag, words in USAGE_ERRORS.items():
        if frag in typed:
            assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (typed, p.stderr)
            return
    assert p.returncode == 0, f"{typed}: exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


ALL = list(dict.fromkeys(readme_commands() + help_commands()))  # in order: convert hf_final -> as_megaent -> hf_again


FAST = [c for c in ALL if not _needs_run(c)]
SLOW = [c for c in ALL if _needs_run(c)]


def test_commands_found():
    """The parser sees the README's lines and one example per verb (a silent empty list would pass vacuously)."""
    assert len(readme_commands()) >= 8
    assert {c.split()[1] for c in ALL} == set(VERBS)


@pytest.mark.parametrize("cmd", FAST)
def test_fast_command(cmd, workdir):
    _check(cmd, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", SLOW)
def test_run_command(cmd, trained):
    _check(cmd, trained)
