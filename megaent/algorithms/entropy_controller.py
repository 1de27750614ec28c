"""Entropy controller: steer KL-Cov's k or Clip-Cov's r every step so policy entropy tracks a target.

Cui et al. 2025 (Sec. 4) stop entropy collapse by penalising (KL-Cov, fraction k of tokens) or detaching
(Clip-Cov, fraction r) the tokens with the largest Cov(log pi, A), and note that k and r need hand tuning
per model. Both act the same way: a larger fraction removes more of the covariance that drains entropy,
so entropy falls more slowly (or rises). This controller picks the fraction each step.

Control law (a velocity-form PI controller on u = log(ratio), clamped to [log ratio_min, log ratio_max]).
At step t, with H_t the policy's token-mean entropy on the step's rollout batch (before the update),
dH_t the step's entropy change under the ratio it used (`algorithm.entropy_controller_signal`: measured
on the probe's positions, the default, or predicted by the exact -mean Cov of `megaent.ops.entropy_change`,
to first or second order), T(t) the target:

    e_t   = (T(t+1) - (H_t + dH_t)) / T(t+1)                 relative error of the forecast entropy
    r_t   = ((T(t+1) - T(t)) - dH_t) / T(t+1)                 how much faster entropy falls than the target
    u_t+1 = clamp(u_t + ki * e_t + kp * r_t)

The r_t term is the proportional term's increment: e_t - e_{t-1} ~ (dT - dH) / T, read from the predicted
dH of this step instead of a difference of noisy measured entropies, so the controller reacts in the step
the collapse starts. The velocity form with a clamp has no integral wind-up: at a bound the next error of
the other sign moves u away from it at once. Positive errors (entropy below target) raise the ratio.

Pure host-side arithmetic on Python floats (the trainer syncs the step's metrics once, then calls update);
state_dict()/load_state_dict() make a resumed run continue exactly.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

TargetSchedule = Literal["constant", "linear", "cosine"]
TARGET_SCHEDULES = ("constant", "linear", "cosine")


def target_entropy_at(step: int, *, start: float, final: Optional[float] = None,
                      schedule: TargetSchedule = "constant", total_steps: int = 1) -> float:
    """Target entropy (nats / token) at RL step `step` (1-based, as the trainer counts).

    constant: `start` always. linear / cosine: from `start` at step 1 to `final` at `total_steps` (and
    `final` after it), straight or along half a cosine.
    """
    if schedule not in TARGET_SCHEDULES:
        raise ValueError(f"algorithm.target_entropy_schedule={schedule!r}: must be one of "
                         f"{', '.join(TARGET_SCHEDULES)}")
    if schedule == "constant" or final is None or total_steps <= 1:
        return float(start)
    frac = min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
    if schedule == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return float(start + (final - start) * frac)


class EntropyController:
    """Adjusts one selection fraction (KL-Cov's k or Clip-Cov's r) so entropy follows a target.

    Args (keyword-only):
        ratio: the starting fraction (the config's kl_cov_ratio / clip_cov_ratio).
        target: target entropy at step 1 (nats / token). final, schedule, total_steps: see
            `target_entropy_at`.
        ratio_min, ratio_max: bounds of the fraction (0 < ratio_min <= ratio <= ratio_max).
        ki: gain on the relative forecast error, in log-ratio per unit relative error.
        kp: gain on the relative rate error, in log-ratio per unit (dT - dH) / T.
        knob: the config key of the fraction, used in the metrics' names only.
    The bounds and gains have no defaults here: they come from the config schema (ki = 1, kp = 5 there).
    """

    def __init__(self, *, ratio: float, target: float, ratio_min: float, ratio_max: float, ki: float, kp: float,
                 knob: str, final: Optional[float] = None, schedule: TargetSchedule = "constant",
                 total_steps: int = 1) -> None:
        if not 0 < ratio_min <= ratio_max:
            raise ValueError(f"entropy controller bounds [{ratio_min}, {ratio_max}]: need 0 < min <= max")
        if target <= 0 or (final is not None and final <= 0):
            raise ValueError(f"algorithm.target_entropy={target} (final {final}): must be > 0 nats / token")
        target_entropy_at(1, start=target, final=final, schedule=schedule, total_steps=total_steps)  # validates
        self.target, self.final, self.schedule, self.total_steps = float(target), final, schedule, total_steps
        self.ratio_min, self.ratio_max, self.ki, self.kp, self.knob = ratio_min, ratio_max, ki, kp, knob
        self.log_ratio = math.log(min(max(ratio, ratio_min), ratio_max))

    @property
    def ratio(self) -> float:
        """The fraction to use for the next update."""
        return min(max(math.exp(self.log_ratio), self.ratio_min), self.ratio_max)  # exp(log b) may miss b

    def target_at(self, step: int) -> float:
        return target_entropy_at(step, start=self.target, final=self.final, schedule=self.schedule,
                                 total_steps=self.total_steps)

    def update(self, *, step: int, entropy: float, pred_dH: float) -> dict[str, float]:
        """After step `step`'s update: entropy = H_t (before the update, on its rollout batch), pred_dH = the
        predicted entropy change of that update. Sets `ratio` for step + 1 and returns the metrics
        {"controller/target_entropy", "controller/error", "controller/<knob>"} (the ratio used next)."""
        t_now, t_next = self.target_at(step), self.target_at(step + 1)
        forecast = entropy + pred_dH
        err = (t_next - forecast) / t_next
        rate = ((t_next - t_now) - pred_dH) / t_next
        u = self.log_ratio + self.ki * err + self.kp * rate
        self.log_ratio = min(max(u, math.log(self.ratio_min)), math.log(self.ratio_max))
        return {"controller/target_entropy": t_now, "controller/error": (t_now - entropy) / t_now,
                f"controller/{self.knob}": self.ratio}

    def state_dict(self) -> dict[str, float]:
        return {"log_ratio": self.log_ratio}

    def load_state_dict(self, sd: dict[str, float]) -> None:
        u = float(sd["log_ratio"])
        self.log_ratio = min(max(u, math.log(self.ratio_min)), math.log(self.ratio_max))
