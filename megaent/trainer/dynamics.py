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
"""
from __future__ import annotations

import math
from typing import Any


class EntropyDynamics:
    def __init__(self) -> None:
        self.pred: list[float] = []
        self.meas: list[float] = []

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
        return {"pred": list(self.pred), "meas": list(self.meas)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pred = [float(x) for x in sd.get("pred", [])]
        self.meas = [float(x) for x in sd.get("meas", [])]


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
