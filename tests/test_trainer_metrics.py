"""trainer.metrics against known values (numpy/scipy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.metrics import all_metrics, bootstrap_ci, krcc, plcc, rmse, srocc


def test_perfect_monotone_and_reversed():
    x = [0.1, 0.4, 0.5, 0.9, 1.0]
    y = [1.0, 2.0, 8.0, 9.0, 100.0]  # monotone but not linear
    assert srocc(x, y) == pytest.approx(1.0)
    assert krcc(x, y) == pytest.approx(1.0)
    assert srocc(x, y[::-1]) == pytest.approx(-1.0)
    assert krcc(x, y[::-1]) == pytest.approx(-1.0)
    assert plcc(x, y) < 1.0


def test_hand_computed_case():
    pred = [1.0, 2.0, 3.0, 4.0]
    target = [1.0, 3.0, 2.0, 4.0]
    # ranks differ by d = (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert srocc(pred, target) == pytest.approx(0.8)
    # 6 pairs, 5 concordant, 1 discordant: tau = (5 - 1) / 6
    assert krcc(pred, target) == pytest.approx(4 / 6)
    # Pearson: both have mean 2.5, sum of products of deviations 4, variances 5 -> 0.8
    assert plcc(pred, target) == pytest.approx(0.8)
    assert rmse(pred, target) == pytest.approx(math.sqrt(2 / 4))
    assert rmse([0.0, 0.0], [3.0, 4.0]) == pytest.approx(math.sqrt(12.5))


def test_undefined_cases_are_nan_not_errors():
    assert math.isnan(srocc([1.0], [2.0]))
    assert math.isnan(plcc([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="lengths differ"):
        srocc([1, 2, 3], [1, 2])


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    target = rng.uniform(size=60)
    pred = target + rng.normal(scale=0.1, size=60)
    est = bootstrap_ci(srocc, pred, target, n_boot=200, seed=3)
    assert est.low <= est.value <= est.high
    assert est == bootstrap_ci(srocc, pred, target, n_boot=200, seed=3)
    groups = np.repeat(np.arange(12), 5)
    grouped = bootstrap_ci(srocc, pred, target, n_boot=200, seed=3, groups=groups)
    assert grouped.value == est.value and grouped.low <= grouped.value <= grouped.high
    metrics = all_metrics(pred, target, n_boot=50)
    assert set(metrics) == {"SROCC", "PLCC", "KRCC", "RMSE"}
    assert metrics["SROCC"].value > 0.8
