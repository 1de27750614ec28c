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
    ("algorithm.target_entropy=0.5", "set algorithm.policy_loss=kl_cov or clip_cov"),
    ("rollout.weight_sync=distributed", "shares the training policy (no sync at all)"),
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


# One bad value per key of the schema (or why the key takes any value of its type). Strings are overrides that
# load_config must refuse; ("preflight", override) are refused by `megaent.trainer.run.preflight`, which checks
# paths and the layout before anything is built. test_every_key_has_a_check fails when a key is added without
# a row here.
ANY = None
BAD = {
    "model.path": ("preflight", "model.path=/nonexistent/model"),
    "model.dtype": "float8", "model.backend": "cuda", "model.precision": "fp4", "model.fp8_recipe": "nope",
    "model.activation_checkpointing": "some", "model.apex": "on", "model.compile": "maybe",
    "model.pipeline_layers": "[1,0]", "model.demo_warmup_steps": "-1", "model.attn_implementation": "eager",
    "parallel.tp": "0", "parallel.pp": "-1", "parallel.ep": "0", "parallel.backend": "mpi", "parallel.timeout_s": "0",
    "data.path": ("preflight", "data.path=/nonexistent/prompts.jsonl"),
    "data.task": ("preflight", "data.task=sudoku"), "data.task_max_digits": "0", "data.prompt_key": "''",
    "data.answer_key": "''", "data.max_prompt_len": "-1", "data.apply_chat_template": "maybe",
    "data.shuffle": "maybe",
    "reward.kind": "llm", "reward.timeout_s": "0", "reward.workers": "-1", "reward.worker_memory_gib": "0",
    "reward.format_reward": "-0.5",
    "rollout.engine": "vllm", "rollout.urls": "[ftp://h:1]", "rollout.n_samples": "0", "rollout.temperature": "0",
    "rollout.top_p": "1.5", "rollout.top_k": "0", "rollout.max_new_tokens": "0", "rollout.ignore_eos": "maybe",
    "rollout.request_timeout_s": "-1",
    "rollout.weight_sync": "ftp", "rollout.sglang_mem_fraction": "1.0", "rollout.sglang_tp": "0",
    "rollout.colocate": "maybe", "rollout.async_steps": "2", "rollout.async_old_logprobs": "proximal",
    "algorithm.policy_loss": "dpo", "algorithm.clip_ratio_low": "1.5", "algorithm.clip_ratio_high": "-0.1",
    "algorithm.dual_clip_c": "1.0", "algorithm.clip_cov_ratio": "0.5", "algorithm.clip_cov_lb": "9",
    "algorithm.clip_cov_ub": "0.5", "algorithm.kl_cov_ratio": "0", "algorithm.kl_cov_coef": "-1",
    "algorithm.loss_agg": "sum", "algorithm.cov_scope": "rank", "algorithm.entropy_coef": "-1",
    "algorithm.kl_coef": "-1", "algorithm.kl_estimator": "k2", "algorithm.advantage": "ppo",
    "algorithm.norm_adv_by_std": "maybe", "algorithm.group_filter": "maybe", "algorithm.group_filter_max_tries": "0",
    "algorithm.target_entropy": "0", "algorithm.target_entropy_schedule": "step",
    "algorithm.target_entropy_final": "-1", "algorithm.entropy_controller_ratio_min": "0",
    "algorithm.entropy_controller_ratio_max": "0.5", "algorithm.entropy_controller_ki": "-1",
    "algorithm.entropy_controller_kp": "-1", "algorithm.entropy_controller_signal": "guess",
    "optimizer.lr": "inf", "optimizer.weight_decay": "-1", "optimizer.beta1": "1.0", "optimizer.beta2": "-0.1",
    "optimizer.eps": "0", "optimizer.grad_clip": "-1", "optimizer.warmup_steps": "-1", "optimizer.schedule": "step",
    "optimizer.min_lr_ratio": "2", "optimizer.distributed_optimizer": "maybe",
    "trainer.steps": "0", "trainer.seed": "-1", "trainer.run_dir": ("preflight", "trainer.run_dir=/dev/null/run"),
    "trainer.prompts_per_step": "0", "trainer.mini_batch_size": "5", "trainer.ppo_epochs": "0",
    "trainer.max_tokens_per_micro_batch": "0", "trainer.head_chunk_size": "0", "trainer.share_prompt_prefix": "maybe",
    "trainer.checkpoint_every": "-1", "trainer.keep_last": "0", "trainer.verify_checkpoints": "maybe",
    "trainer.dynamics_every": "-2", "trainer.dynamics_budget": "-1", "trainer.samples_to_log": "-1", "trainer.quiet": "maybe",
    "trainer.wandb_project": ANY,  # any name; wandb checks it
    "trainer.export_hf_every": "-1", "trainer.threads": "-1", "trainer.keep_freed_memory": "maybe",
    "slurm.nodes": "0", "slurm.gpus_per_node": "-1", "slurm.tasks_per_node": "-1", "slurm.rollout_nodes": "-1",
    "slurm.partition": ANY, "slurm.account": ANY,  # cluster names, checked by sbatch
    "slurm.time": ANY,  # its format is checked by `megaent submit` (tests/test_slurm_render.py)
    "slurm.job_name": "'two words'", "slurm.signal_before_s": "-1", "slurm.rollout_port": "70000",
    "slurm.rollout_wait_s": "0", "slurm.extra_sbatch": "[qos]",
    "slurm.rollout_server_cmd": "'megaent serve --model {model}'",  # no {port}: the trainer's URL would be wrong
    "slurm.setup": ANY,  # shell lines
}


def test_async_and_colocate_need_servers_and_exclude_each_other():
    for args, needle in ((["rollout.async_steps=1"], "rollout.engine=http/sglang"),
                         (["rollout.colocate=true"], "rollout.engine=http/sglang"),
                         (["rollout.engine=http", "rollout.urls=[http://h:1]", "rollout.colocate=true",
                           "rollout.async_steps=1"], "rollout.async_steps=0")):
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_config(None, args)
    cfg = load_config(None, ["rollout.engine=http", "rollout.urls=[http://h:1]", "rollout.async_steps=1"])
    assert cfg.rollout.async_steps == 1 and Config().rollout.async_steps == 0


def test_every_key_has_a_check():
    keys = [k for k, _, _ in field_docs()]
    assert sorted(BAD) == sorted(keys), f"add rows for {set(keys) - set(BAD)}; drop {set(BAD) - set(keys)}"


@pytest.mark.parametrize("key", sorted(k for k, v in BAD.items() if v is not ANY))
def test_bad_value_is_one_line_naming_the_key(key, tmp_path):
    from megaent.trainer.run import preflight

    bad = BAD[key]
    with pytest.raises(ConfigError) as exc:
        if isinstance(bad, tuple):
            preflight(load_config(None, [bad[1], f"trainer.run_dir={tmp_path}"] if key != "trainer.run_dir"
                                  else [bad[1]]))
        else:
            load_config(None, [f"{key}={bad}"])
    msg = str(exc.value)
    assert key in msg and "\n" not in msg, msg


def _float_keys():
    from megaent.config.validate import leaves

    return [k for k, v in leaves(Config()) if isinstance(v, float)]


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_must_be_finite(key):
    for bad in ("inf", "-inf", "nan"):
        with pytest.raises(ConfigError, match=f"{key}=.*: must be a finite number"):
            load_config(None, [f"{key}={bad}"])
