"""`megaent convert`: HF -> megaent checkpoint -> HF reproduces every tensor bit for bit (single process), and a
HF -> HF round trip through TP=2 (torchrun, 2 gloo ranks) does too, also for Qwen3, Mistral and Qwen3-MoE.
Reference: the source safetensors files.
Run: pytest tests/test_convert.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_tiny import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _run(args, n=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n > 1 \
        else [sys.executable]
    return subprocess.run([*head, "-m", "megaent.cli", "convert", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
def test_hf_megaent_hf_round_trip(tmp_path):
    src = make_tiny_hf(tmp_path / "hf", family="qwen2", vocab_size=1001, tie=True, qkv_bias=True)
    p = _run([str(src), str(tmp_path / "ck")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "ck" / "COMPLETE").is_file()
    p = _run([str(tmp_path / "ck"), str(tmp_path / "back")])
    assert p.returncode == 0, p.stderr[-2000:]
    _assert_same(src, tmp_path / "back")
    p = _run([str(src), str(tmp_path / "tp2"), "--tp", "2", "--to", "hf"], n=2)
    assert p.returncode == 0, p.stderr[-2000:]
    _assert_same(src, tmp_path / "tp2")


def test_convert_bad_source_exits_2(tmp_path):
    p = _run([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert p.returncode == 2 and "neither a HF directory" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "mistral", "qwen3_moe"])
def test_families_round_trip_through_tp2(tmp_path, family):
    """Qwen3 (q/k norms), Mistral (sliding window kept in config.json) and Qwen3-MoE (held on GPTPolicy, no
    forward run): HF -> HF through TP=2 is bit-exact."""
    import json

    from test_model_families import make_family_hf

    extra = {"sliding_window": 4096} if family == "mistral" else {}
    src = make_family_hf(tmp_path / "hf", family, **extra)
    p = _run([str(src), str(tmp_path / "tp2"), "--tp", "2", "--to", "hf"], n=2)
    assert p.returncode == 0, p.stderr[-2000:]
    _assert_same(src, tmp_path / "tp2")
    cfg = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg.get("sliding_window") == extra.get("sliding_window")
