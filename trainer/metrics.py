"""Agreement between predicted scores and labels: SROCC, PLCC, KRCC, RMSE, with bootstrap confidence intervals.

Each metric is a small pure function of two equal-length 1D sequences (prediction, target). Ties are handled as
scipy does (average ranks for SROCC, tau-b for KRCC). A metric that is undefined (fewer than 2 pairs, or a
constant input for a correlation) returns NaN instead of raising.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def _pair(pred: Sequence[float], target: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction and target lengths differ: {p.size} vs {t.size}")
    return p, t


def _undefined(p: np.ndarray, t: np.ndarray) -> bool:
    return p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0


def srocc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Spearman rank-order correlation: Pearson correlation of the (average-tie) ranks; in [-1, 1]."""
    p, t = _pair(pred, target)
    return float("nan") if _undefined(p, t) else float(stats.spearmanr(p, t)[0])


def plcc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Pearson linear correlation of the raw values (no logistic fitting); in [-1, 1]."""
    p, t = _pair(pred, target)
    return float("nan") if _undefined(p, t) else float(np.corrcoef(p, t)[0, 1])


def krcc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Kendall rank correlation (tau-b); in [-1, 1]."""
    p, t = _pair(pred, target)
    return float("nan") if _undefined(p, t) else float(stats.kendalltau(p, t)[0])


def rmse(pred: Sequence[float], target: Sequence[float]) -> float:
    """Root mean squared error, in the units of the inputs (score units here)."""
    p, t = _pair(pred, target)
    return float("nan") if p.size == 0 else float(np.sqrt(np.mean((p - t) ** 2)))


METRICS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "SROCC": srocc,
    "PLCC": plcc,
    "KRCC": krcc,
    "RMSE": rmse,
}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    metric: Callable[[Sequence[float], Sequence[float]], float],
    pred: Sequence[float],
    target: Sequence[float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence[object] | None = None,
) -> Estimate:
    """Percentile bootstrap CI of ``metric``: resample pairs with replacement ``n_boot`` times.

    With ``groups`` (e.g. subject ids) whole groups are resampled (cluster bootstrap), which is the honest
    choice when several degraded versions share one subject. NaN resamples are dropped.
    """
    p, t = _pair(pred, target)
    value = metric(p, t)
    if p.size < 2:
        return Estimate(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(p.size)]
    else:
        g = np.asarray(groups)
        members = [np.flatnonzero(g == u) for u in dict.fromkeys(g.tolist())]
    values = []
    for _ in range(n_boot):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), size=len(members))])
        v = metric(p[pick], t[pick])
        if np.isfinite(v):
            values.append(v)
    if not values:
        return Estimate(value, float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return Estimate(value, float(low), float(high))


def all_metrics(
    pred: Sequence[float],
    target: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[object] | None = None,
) -> dict[str, Estimate]:
    """Every metric of :data:`METRICS` with its bootstrap CI."""
    return {
        name: bootstrap_ci(fn, pred, target, n_boot=n_boot, seed=seed, groups=groups) for name, fn in METRICS.items()
    }
