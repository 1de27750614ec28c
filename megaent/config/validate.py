"""Range and consistency checks that types alone cannot express.

`RULES` holds one range check per numeric key (and the few string keys with a shape), `_consistency` the checks
that relate keys; every float must also be finite (`inf`/`nan` never reach a run). Keys without a rule take any
value of their type (OmegaConf checks the type, `Literal` keys their choices) or are checked where they are used
(paths by `megaent.trainer.run.preflight`). Each message names the key, the bad value and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

from megaent.config.errors import ConfigError
from megaent.config.schema import Config

Rule = tuple[Callable[[Any], bool], str]

SERVER_CMD_FIELDS = ("python", "model", "port")  # the fields of slurm.rollout_server_cmd
_SERVER_CMD_FIELD = re.compile(r"(?<!\$)\{(\w*)\}")  # {port}, not bash's ${VAR}


def server_cmd_fields(cmd: str) -> list[str]:
    """The `{name}` fields of a slurm.rollout_server_cmd template, in order (bash's `${VAR}` is not one)."""
    return _SERVER_CMD_FIELD.findall(cmd)


def fill_server_cmd(cmd: str, values: dict[str, str]) -> str:
    """Replace the `{name}` fields of a validated slurm.rollout_server_cmd template."""
    return _SERVER_CMD_FIELD.sub(lambda m: values[m.group(1)], cmd)


def _at_least(n: int | float, why: str = "") -> Rule:
    return (lambda v: v >= n), f"must be >= {n}{why}"


def _positive(why: str = "") -> Rule:
    return (lambda v: v > 0), f"must be > 0{why}"


def _unit(lo_open: bool, hi_open: bool, why: str = "") -> Rule:
    lo, hi = ("(" if lo_open else "["), (")" if hi_open else "]")
    return ((lambda v: (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)),
            f"must be in {lo}0, 1{hi}{why}")


RULES: dict[str, Rule] = {
    "model.demo_warmup_steps": _at_least(0, " (0 = RL from the random tiny policy)"),
    "parallel.tp": _at_least(1),
    "parallel.pp": _at_least(1),
    "parallel.ep": _at_least(1, " (1 = every rank holds all experts)"),
    "parallel.timeout_s": _at_least(1, " seconds; the default is 1800"),
    "data.task_max_digits": _at_least(1),
    "data.prompt_key": ((lambda v: bool(v)), "must name the prompt field of the data file"),
    "data.answer_key": ((lambda v: bool(v)), "must name the answer field of the data file"),
    "data.max_prompt_len": _at_least(1, " tokens"),
    "reward.timeout_s": _positive(" seconds; the default is 5"),
    "reward.workers": ((lambda v: 0 <= v <= 256), "must be in [0, 256] (0 = in-process where the verifier allows)"),
    "reward.worker_memory_gib": _positive(" GiB; the default is 4"),
    "reward.format_reward": _at_least(0, " (0 = off)"),
    "rollout.urls": ((lambda v: all(u.startswith(("http://", "https://")) for u in v)),
                     "each URL must start with http:// or https://, e.g. [http://127.0.0.1:30000]"),
    "rollout.n_samples": _at_least(1, "; GRPO needs >= 2"),
    "rollout.temperature": _positive("; the paper uses 1.0"),
    "rollout.top_p": _unit(True, False),
    "rollout.top_k": ((lambda v: v == -1 or v >= 1), "must be -1 (off) or >= 1"),
    "rollout.max_new_tokens": _at_least(1),
    "rollout.request_timeout_s": _positive(" seconds; the default is 600"),
    "rollout.sglang_mem_fraction": _unit(True, True, "; SGLang's default is 0.8"),
    "rollout.sglang_tp": _at_least(1),
    "rollout.async_steps": ((lambda v: v in (0, 1)), "must be 0 (synchronous) or 1 (one step ahead); deeper "
                            "pipelines are not implemented"),
    "algorithm.clip_ratio_low": ((lambda v: 0 <= v <= 1), "must be in [0, 1]; usually 0.2 (the paper's Clip-Cov "
                                 "scripts use 1: no lower bound)"),
    "algorithm.clip_ratio_high": _at_least(0, "; usually 0.2 or 0.28"),
    "algorithm.dual_clip_c": ((lambda v: v is None or v > 1), "must be > 1 (e.g. 3.0) or null to disable"),
    "algorithm.clip_cov_ratio": ((lambda v: 0 < v <= 0.1),
                                 "must be in (0, 0.1]; the paper uses 2e-4 (tiny CPU demos need ~1e-2 to touch any "
                                 "token)"),
    "algorithm.kl_cov_ratio": ((lambda v: 0 < v <= 0.1), "must be in (0, 0.1]; the paper uses 2e-3 (7B) or 2e-4 (32B)"),
    "algorithm.kl_cov_coef": _at_least(0, "; the paper uses 1"),
    "algorithm.entropy_coef": _at_least(0, " (0 = off, as in the paper)"),
    "algorithm.kl_coef": _at_least(0, " (0 = off, as in the paper)"),
    "algorithm.group_filter_max_tries": _at_least(1),
    "algorithm.target_entropy": ((lambda v: v is None or v > 0), "must be > 0 nats / token, or null (off)"),
    "algorithm.target_entropy_final": ((lambda v: v is None or v > 0), "must be > 0 nats / token, or null"),
    "algorithm.entropy_controller_ratio_min": ((lambda v: 0 < v <= 0.1), "must be in (0, 0.1]; the default is 1e-5"),
    "algorithm.entropy_controller_ratio_max": ((lambda v: 0 < v <= 0.1), "must be in (0, 0.1]; the default is 0.1"),
    "algorithm.entropy_controller_ki": _at_least(0, "; the default is 1"),
    "algorithm.entropy_controller_kp": _at_least(0, "; the default is 5"),
    "optimizer.lr": _positive("; the paper uses 5e-7 (7B) or 1e-6 (32B)"),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.beta1": _unit(False, True, "; usually 0.9"),
    "optimizer.beta2": _unit(False, True, "; usually 0.999"),
    "optimizer.eps": _positive("; usually 1e-8"),
    "optimizer.grad_clip": _at_least(0, " (0 disables clipping)"),
    "optimizer.warmup_steps": _at_least(0),
    "optimizer.min_lr_ratio": _unit(False, False),
    "trainer.steps": _at_least(1),
    "trainer.seed": _at_least(0),
    "trainer.prompts_per_step": _at_least(1),
    "trainer.mini_batch_size": _at_least(1),  # divides prompts_per_step: _consistency
    "trainer.ppo_epochs": _at_least(1),
    "trainer.max_tokens_per_micro_batch": _at_least(1),
    "trainer.head_chunk_size": _at_least(1),
    "trainer.checkpoint_every": _at_least(0, " (0 = only at the end and on signals)"),
    "trainer.keep_last": _at_least(1),
    "trainer.dynamics_every": _at_least(0, " (0 = off)"),
    "trainer.dynamics_budget": _at_least(0, " (0 = off)"),
    "trainer.samples_to_log": _at_least(0),
    "trainer.export_hf_every": _at_least(0, " (0 = only at the end)"),
    "trainer.threads": _at_least(0, " (0 = torch's default)"),
    "slurm.nodes": _at_least(1),
    "slurm.gpus_per_node": _at_least(0, " (0 = CPU tasks)"),
    "slurm.tasks_per_node": _at_least(0),
    "slurm.rollout_nodes": _at_least(0),
    "slurm.job_name": ((lambda v: bool(v) and not any(c.isspace() for c in v)), "must be a non-empty word"),
    "slurm.signal_before_s": _at_least(0),
    "slurm.rollout_port": ((lambda v: 1 <= v <= 65535), "must be a TCP port in [1, 65535]"),
    "slurm.rollout_wait_s": _at_least(1, " seconds"),
    "slurm.extra_sbatch": ((lambda v: all(str(x).startswith("-") for x in v)),
                           "each entry must be one sbatch option, e.g. [\"--qos=high\"]"),
    "slurm.rollout_server_cmd": ((lambda v: not v or (set(server_cmd_fields(v)) <= set(SERVER_CMD_FIELDS)
                                                      and "port" in server_cmd_fields(v))),
                                 "may use only {python}, {model} and {port}, and needs {port} (the URL the trainer "
                                 "is given), e.g. \"megaent serve --model {model} --host 0.0.0.0 --port {port}\"; "
                                 "empty = the default server"),
}


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")


def leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf field of a config dataclass instance."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(leaves(value, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, value))
    return out


def _consistency(cfg: Config) -> None:
    a, t, r, p = cfg.algorithm, cfg.trainer, cfg.rollout, cfg.parallel
    _check(a.clip_cov_lb < a.clip_cov_ub, "algorithm.clip_cov_lb", a.clip_cov_lb,
           f"must be below algorithm.clip_cov_ub={a.clip_cov_ub}; the paper uses 1 and 5")
    _check(r.engine != "http" or bool(r.urls), "rollout.urls", r.urls,
           "rollout.engine=http needs at least one server URL, e.g. rollout.urls=[http://127.0.0.1:30000]")
    _check(r.weight_sync == "disk" or r.engine in ("http", "sglang"), "rollout.weight_sync", r.weight_sync,
           f"the {r.engine} rollout engine shares the training policy (no sync at all): set "
           "rollout.weight_sync=disk (the default), or rollout.engine=http/sglang for servers to sync into")
    for key, on in (("rollout.async_steps", r.async_steps > 0), ("rollout.colocate", r.colocate)):
        _check(not on or r.engine in ("http", "sglang"), key, getattr(r, key.split(".")[1]),
               f"the {r.engine} rollout engine decodes on the training policy in this process, so it can neither "
               f"run during the update nor release its memory: set {key}={'0' if 'async' in key else 'false'}, "
               "or rollout.engine=http/sglang with servers in other processes")
    _check(not (r.colocate and r.async_steps), "rollout.async_steps", r.async_steps,
           "colocated servers release their memory during the update, when asynchronous generation would run: "
           "set rollout.async_steps=0, or rollout.colocate=false with servers on their own GPUs")
    _check(t.prompts_per_step % t.mini_batch_size == 0, "trainer.mini_batch_size", t.mini_batch_size,
           f"must divide trainer.prompts_per_step={t.prompts_per_step}")
    if a.target_entropy is not None:
        _check(a.policy_loss in ("kl_cov", "clip_cov"), "algorithm.target_entropy", a.target_entropy,
               f"the entropy controller steers KL-Cov's k or Clip-Cov's r: set algorithm.policy_loss=kl_cov or "
               f"clip_cov (got {a.policy_loss}), or algorithm.target_entropy=null")
        _check(t.dynamics_every == 1 and t.dynamics_budget > 0, "trainer.dynamics_every", t.dynamics_every,
               f"the entropy controller reads the probe's predicted dH every step: set trainer.dynamics_every=1 and "
               f"trainer.dynamics_budget > 0 (is {t.dynamics_budget}), or algorithm.target_entropy=null")
        _check(a.entropy_controller_ratio_min <= a.entropy_controller_ratio_max,
               "algorithm.entropy_controller_ratio_min", a.entropy_controller_ratio_min,
               f"must be <= algorithm.entropy_controller_ratio_max={a.entropy_controller_ratio_max}")
        _check(a.target_entropy_schedule == "constant" or a.target_entropy_final is not None,
               "algorithm.target_entropy_final", a.target_entropy_final,
               f"target_entropy_schedule={a.target_entropy_schedule} needs a final target (nats), e.g. "
               f"algorithm.target_entropy_final={a.target_entropy / 2:g}")
    layers = cfg.model.pipeline_layers
    _check(layers is None or (len(layers) == p.pp and all(n >= 1 for n in layers)), "model.pipeline_layers",
           layers, f"needs parallel.pp={p.pp} entries, each >= 1 (or null for an even split)")
    _check(not t.share_prompt_prefix, "trainer.share_prompt_prefix", t.share_prompt_prefix,
           "set it to false: the megatron-core engine's packed (THD) attention has no shared-prefix layout yet")


def validate(cfg: Config) -> None:
    """Raise `ConfigError` for the first out-of-range, non-finite or inconsistent value."""
    for key, value in leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        rule = RULES.get(key)
        if rule is not None:
            ok, fix = rule
            _check(ok(value), key, value, fix)
    _consistency(cfg)
