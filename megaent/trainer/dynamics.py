"""Entropy-dynamics diagnostic: does Cov(log pi, A) predict how entropy moves? (Cui et al. 2025, Sec. 3)

For a softmax policy trained by (natural) policy gradient with step size eta, one update changes entropy by
about  dH ~= -eta * Cov_{a~pi}(log pi(a), A(a))  (the paper's Theorem 2/Corollary): confident tokens with high
advantage drain entropy. Every `trainer.dynamics_every` steps the trainer measures, on the same rollout batch,
the token-mean entropy before the step's updates and after them, and logs

    dynamics/pred_dH      -lr * cov/mean (the batch covariance at the old policy; sign and scale of the theory)
    dynamics/dH           entropy/mean after - before (measured)
    dynamics/corr         Pearson correlation of the two over all observations so far
    dynamics/sign_agree   fraction of observations where they have the same sign

The absolute scale of pred_dH is only indicative (Adam, clipping and several updates per step depart from the
theorem's plain gradient step); the correlation is the quantity to watch.

The exact first-order term (issue #26). `megaent.ops.entropy_change` gives, at positions sampled from the step's
rollout batch, Cov_{pi_old}(log pi_old, z_new - z_old) and both exact entropies; whatever the optimiser did,
H_new - H_old = -Cov + O(|dz|^2) (the paper's Lemma 1). `exact_dynamics_stats` reduces those per-position values
to 0-d tensors (one all-reduce over the data-parallel group), and `EntropyDynamics.observe_exact` turns them
into

    dynamics/exact_pred_dH     -mean Cov over the sampled positions (all DP ranks)
    dynamics/exact_dH          mean H_new - H_old over the same positions (measured)
    dynamics/exact_ratio       exact_dH / exact_pred_dH this step (1 = first order is exact; absent if pred = 0)
    dynamics/exact_corr        Pearson correlation of the two over all observations so far (RunningCorrelation)
    dynamics/exact_sign_agree  fraction of observations where they have the same sign
    dynamics/exact_second      mean second-order term -1/2 (Var_pi(dz) + Cov_pi(log pi, g^2)) on the positions
                               (H_new - H_old = -Cov + second + O(|dz|^3); large when the step is large)
    dynamics/exact_pred2_corr  correlation of exact_pred_dH + exact_second with exact_dH so far
    time/probe_s               seconds the probe's own work took (head copy, gathers, the op, its reductions)
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

from megaent.ops.stats import global_sum

Group = Optional[dist.ProcessGroup]


class RunningCorrelation:
    """Pearson correlation of a stream of (x, y) pairs in O(1) memory (Welford's co-moment update, fp64 floats).

    `update(x, y)` returns the correlation over all pairs so far, or None with fewer than 3 pairs or zero
    variance (as `pearson`). Also counts sign agreement. Resumable: `state_dict()` is plain floats, and a run
    resumed from it continues exactly as the uninterrupted one.
    """

    def __init__(self) -> None:
        self.n, self.mx, self.my, self.sxx, self.syy, self.sxy, self.agree = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0

    def update(self, x: float, y: float) -> Optional[float]:
        self.n += 1
        dx = x - self.mx
        self.mx += dx / self.n
        dy = y - self.my
        self.my += dy / self.n
        self.sxx += dx * (x - self.mx)
        self.syy += dy * (y - self.my)
        self.sxy += dx * (y - self.my)
        self.agree += int((x > 0) == (y > 0))
        return self.value

    @property
    def value(self) -> Optional[float]:
        if self.n < 3 or self.sxx <= 0 or self.syy <= 0:
            return None
        return max(-1.0, min(1.0, self.sxy / math.sqrt(self.sxx * self.syy)))

    @property
    def sign_agree(self) -> Optional[float]:
        return self.agree / self.n if self.n else None

    def state_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("n", "mx", "my", "sxx", "syy", "sxy", "agree")}

    def load_state_dict(self, sd: dict[str, float]) -> None:
        self.__init__()
        for k in ("n", "agree"):
            setattr(self, k, int(sd.get(k, 0)))
        for k in ("mx", "my", "sxx", "syy", "sxy"):
            setattr(self, k, float(sd.get(k, 0.0)))


def exact_dynamics_stats(cov: torch.Tensor, entropy_old: torch.Tensor, entropy_new: torch.Tensor,
                         valid: torch.Tensor, group: Group = None, *, second: Optional[torch.Tensor] = None
                         ) -> dict[str, torch.Tensor]:
    """Per-position results of `megaent.ops.entropy_change` -> the step's exact predicted and measured dH.

    cov, entropy_old, entropy_new: [N] fp32/fp64; valid: [N] bool (`sample_positions`' flag). group: the
    data-parallel group (None = single process): means are over the sampled positions of ALL its ranks, each
    position weighted equally (a rank with fewer valid tokens contributes fewer positions). Returns 0-d fp64
    tensors {"exact_pred_dH": -mean cov, "exact_dH": mean(H_new - H_old), "exact_H_old": mean H_old,
    "exact_positions": count}, plus "exact_second" (mean second-order term) when `second` is given; 0 when no
    position is valid. Collectives: 1 all-reduce of a 4- (5-) vector on `group`. No host sync.
    """
    m = valid.to(torch.bool)
    zero = torch.zeros((), dtype=torch.float64, device=cov.device)

    def total(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x.to(torch.float64), zero).sum()  # where: invalid rows may hold anything

    local = torch.stack([total(cov), total(entropy_new.to(torch.float64) - entropy_old.to(torch.float64)),
                         total(entropy_old), m.sum().to(torch.float64)]
                        + ([total(second)] if second is not None else []))
    s = global_sum(local, group)
    n = s[3].clamp(min=1.0)
    out = {"exact_pred_dH": -s[0] / n, "exact_dH": s[1] / n, "exact_H_old": s[2] / n, "exact_positions": s[3]}
    if second is not None:
        out["exact_second"] = s[4] / n
    return out


class EntropyDynamics:
    def __init__(self) -> None:
        self.pred: list[float] = []
        self.meas: list[float] = []
        self.exact = RunningCorrelation()
        self.exact2 = RunningCorrelation()  # first + second order vs measured

    def observe_exact(self, pred_dH: float, dH: float, *, second: Optional[float] = None) -> dict[str, float]:
        """One step's exact prediction (-mean Cov) and measured dH on the same positions (host floats, e.g.
        `exact_dynamics_stats`' values after the trainer's one sync) -> the `dynamics/exact_*` metrics."""
        pred_dH, dH = float(pred_dH), float(dH)
        corr = self.exact.update(pred_dH, dH)
        out = {"dynamics/exact_pred_dH": pred_dH, "dynamics/exact_dH": dH,
               "dynamics/exact_sign_agree": self.exact.sign_agree}
        if pred_dH != 0.0:
            out["dynamics/exact_ratio"] = dH / pred_dH
        if corr is not None:
            out["dynamics/exact_corr"] = corr
        if second is not None:
            corr2 = self.exact2.update(pred_dH + float(second), dH)
            if corr2 is not None:
                out["dynamics/exact_pred2_corr"] = corr2
        return out

    def observe(self, before: dict[str, float], after: dict[str, float], *, lr: float) -> dict[str, float]:
        pred = -lr * before["cov/mean"]
        meas = after["entropy/mean"] - before["entropy/mean"]
        self.pred.append(pred)
        self.meas.append(meas)
        out = {"dynamics/pred_dH": pred, "dynamics/dH": meas,
               "dynamics/sign_agree": sum((p > 0) == (m > 0) for p, m in zip(self.pred, self.meas)) / len(self.pred)}
        corr = pearson(self.pred, self.meas)
        if corr is not None:
            out["dynamics/corr"] = corr
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"pred": list(self.pred), "meas": list(self.meas), "exact": self.exact.state_dict(),
                "exact2": self.exact2.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pred = [float(x) for x in sd.get("pred", [])]
        self.meas = [float(x) for x in sd.get("meas", [])]
        self.exact.load_state_dict(sd.get("exact", {}))  # checkpoints from before issue #26 have none
        self.exact2.load_state_dict(sd.get("exact2", {}))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, or None with fewer than 3 points or zero variance."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)
