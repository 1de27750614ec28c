"""Config loading: schema defaults <- YAML <- dotted overrides; typos and bad values give ConfigError naming the key
and the fix; the CLI exits 2. Compared against the schema dataclasses themselves and hand-written expectations.
Run: pytest tests/test_config.py
"""
import subprocess
import sys
import textwrap

import pytest

from megaent.config import Config, ConfigError, field_docs, load_config, to_yaml


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optimizer:\n  lr: 3.0e-6\nalgorithm:\n  policy_loss: kl_cov\n")
    cfg = load_config(y, ["optimizer.lr=5e-7", "trainer.steps=7", "rollout.urls=[http://h:1,http://h:2]"])
    assert isinstance(cfg, Config)
    assert cfg.optimizer.lr == 5e-7 and cfg.trainer.steps == 7 and cfg.algorithm.policy_loss == "kl_cov"
    assert cfg.rollout.urls == ["http://h:1", "http://h:2"]
    assert cfg.algorithm.clip_cov_ratio == Config().algorithm.clip_cov_ratio  # untouched default from the schema
    # The resolved YAML round-trips to the same config.
    (tmp_path / "r.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("override,needle", [
    ("optimizer.lrr=1", "did you mean `optimizer.lr`"),
    ("lr=1", "did you mean `optimizer.lr`"),
    ("trainer.stepz=3", "did you mean `trainer.steps`"),
    ("optimizer.lr=abc", "`optimizer.lr`"),
    ("algorithm.policy_loss=foo", "expected one of ['ppo', 'clip_cov', 'kl_cov']"),
    ("algorithm.clip_cov_ratio=0.5", "the paper uses 2e-4"),
    ("trainer.mini_batch_size=5", "must divide trainer.prompts_per_step"),
    ("optimizer.lr", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_yaml_typo_and_missing_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(textwrap.dedent("""
        algorithm:
          clip_cov_ration: 1.0e-3
    """))
    with pytest.raises(ConfigError, match="did you mean `algorithm.clip_cov_ratio`"):
        load_config(y)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_documented():
    docs = field_docs()
    assert len(docs) > 50
    missing = [k for k, _, d in docs if not d]
    assert not missing, f"fields without a docstring: {missing}"


def test_cli_typo_exits_2(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("trainer:\n  steps: 1\n")
    proc = subprocess.run([sys.executable, "-m", "megaent.cli", "train", str(y), "optimizer.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optimizer.lr" in proc.stderr and "did you mean" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_base_chain_and_recipes(tmp_path):
    """`base:` layers a recipe on another; every shipped config loads and validates."""
    import glob

    c = load_config("configs/qwen2.5-32b-kl-cov.yaml")
    assert (c.algorithm.policy_loss, c.algorithm.kl_cov_ratio, c.optimizer.lr) == ("kl_cov", 2e-4, 1e-6)
    assert (c.parallel.tp, c.parallel.pp, c.trainer.prompts_per_step, c.trainer.mini_batch_size) == (8, 2, 256, 32)
    for f in glob.glob("configs/*.yaml"):
        load_config(f)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_config(tmp_path / "c.yaml")
