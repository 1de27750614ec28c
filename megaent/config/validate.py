"""Range and consistency checks that types alone cannot express.

Each message names the key, the bad value and the fix.
"""
from __future__ import annotations

from megaent.config.schema import Config


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    from megaent.config.load import ConfigError

    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")


def validate(cfg: Config) -> None:
    a, o, t, r, p = cfg.algorithm, cfg.optimizer, cfg.trainer, cfg.rollout, cfg.parallel
    _check(p.tp >= 1, "parallel.tp", p.tp, "must be >= 1")
    _check(p.pp >= 1, "parallel.pp", p.pp, "must be >= 1")
    _check(0 < a.clip_cov_ratio <= 0.1, "algorithm.clip_cov_ratio", a.clip_cov_ratio,
           "must be in (0, 0.1]; the paper uses 2e-4 (tiny CPU demos need ~1e-2 to touch any token)")
    _check(a.clip_cov_lb < a.clip_cov_ub, "algorithm.clip_cov_lb", a.clip_cov_lb,
           f"must be below algorithm.clip_cov_ub={a.clip_cov_ub}; the paper uses 1 and 5")
    _check(0 < a.kl_cov_ratio <= 0.1, "algorithm.kl_cov_ratio", a.kl_cov_ratio,
           "must be in (0, 0.1]; the paper uses 2e-3 (7B) or 2e-4 (32B)")
    _check(a.kl_cov_coef >= 0, "algorithm.kl_cov_coef", a.kl_cov_coef, "must be >= 0; the paper uses 1")
    _check(0 <= a.clip_ratio_low < 1, "algorithm.clip_ratio_low", a.clip_ratio_low, "must be in [0, 1); usually 0.2")
    _check(a.clip_ratio_high >= 0, "algorithm.clip_ratio_high", a.clip_ratio_high, "must be >= 0; usually 0.2 or 0.28")
    _check(a.dual_clip_c is None or a.dual_clip_c > 1, "algorithm.dual_clip_c", a.dual_clip_c,
           "must be > 1 (e.g. 3.0) or null to disable")
    _check(o.lr > 0, "optimizer.lr", o.lr, "must be > 0; the paper uses 5e-7 (7B) or 1e-6 (32B)")
    _check(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _check(r.n_samples >= 1, "rollout.n_samples", r.n_samples, "must be >= 1; GRPO needs >= 2")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "must be > 0; the paper uses 1.0")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(r.engine != "http" or bool(r.urls), "rollout.urls", r.urls,
           "rollout.engine=http needs at least one server URL, e.g. rollout.urls=[http://127.0.0.1:30000]")
    _check(t.steps >= 1, "trainer.steps", t.steps, "must be >= 1")
    _check(t.prompts_per_step >= 1, "trainer.prompts_per_step", t.prompts_per_step, "must be >= 1")
    _check(t.mini_batch_size >= 1 and t.prompts_per_step % t.mini_batch_size == 0, "trainer.mini_batch_size",
           t.mini_batch_size, f"must divide trainer.prompts_per_step={t.prompts_per_step}")
    _check(t.ppo_epochs >= 1, "trainer.ppo_epochs", t.ppo_epochs, "must be >= 1")
    _check(t.max_tokens_per_micro_batch >= 1, "trainer.max_tokens_per_micro_batch",
           t.max_tokens_per_micro_batch, "must be >= 1")
    _check(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "must be >= 1")
    layers = cfg.model.pipeline_layers
    _check(layers is None or (len(layers) == p.pp and all(n >= 1 for n in layers)), "model.pipeline_layers",
           layers, f"needs parallel.pp={p.pp} entries, each >= 1 (or null for an even split)")
