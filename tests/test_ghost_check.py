"""The N/2 ghost check (qc_daemon/ghost_check.py) and how it floors the score."""

from __future__ import annotations

import numpy as np
import pytest

from qc_daemon.ghost_check import NO_EFFECT_BELOW, RATIO_TO_SCORE, GhostMeasure, measure_n2_ghost
from qc_daemon.scorer import Scorer
from qc_daemon.settings import ScoringSettings
from qc_daemon.volume import Volume

SHAPE = (72, 84, 64)  # 2 mm voxels: a 144 x 168 x 128 mm field of view


def head(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A head in air, off the field of view's centre as heads are: WM core, GM, CSF shell, faint Rician air."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    grid[2] += 0.1  # nearer the top of the field of view
    r = np.sqrt((grid**2).sum(axis=0))
    v = np.select([r < 0.35, r < 0.55, r < 0.62], [600.0, 400.0, 150.0], 0.0)
    rng = np.random.default_rng(seed)
    return np.hypot(v + rng.normal(0, 6.0, shape), rng.normal(0, 6.0, shape)).astype(np.float32)


def n2_ghost(volume: np.ndarray, amplitude: float, axis: int) -> np.ndarray:
    """An N/2 ghost from a phase error on every other phase-encode line (ghost / image = tan(phi / 2)), written
    here independently of trainer/artifacts.py."""
    shape = [1, 1, 1]
    shape[axis] = volume.shape[axis]
    odd = (np.arange(volume.shape[axis]) % 2 == 1).reshape(shape)
    error = np.where(odd, np.exp(2j * np.arctan(amplitude)), 1.0)
    return np.abs(np.fft.ifftn(np.fft.fftn(volume) * error)).astype(np.float32)


def test_a_clean_head_has_no_measurable_ghost():
    measure = measure_n2_ghost(head())
    assert measure.ratio is not None and measure.ratio < NO_EFFECT_BELOW / 3, measure
    assert measure.score == 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_ratio_follows_the_ghost_along_each_axis(axis):
    ratios = []
    for amplitude in (0.05, 0.12, 0.3):
        measure = measure_n2_ghost(n2_ghost(head(), amplitude, axis))
        assert measure.axis == axis, (amplitude, measure)
        assert 0.4 * amplitude < measure.ratio < 1.3 * amplitude, (amplitude, measure)
        ratios.append(measure.ratio)
    assert ratios == sorted(ratios)


def test_the_score_follows_the_trainers_ghost_anchors():
    ratios, scores = zip(*RATIO_TO_SCORE, strict=True)
    assert GhostMeasure(0.0, 0).score == GhostMeasure(NO_EFFECT_BELOW, 0).score == 1.0
    assert GhostMeasure(0.06, 0).score == pytest.approx(0.65)  # a 7 % ghost: moderate
    assert GhostMeasure(0.10, 0).score == pytest.approx(0.3)  # a 12 % ghost: a scan to repeat
    assert GhostMeasure(1.0, 0).score == 0.0
    assert list(scores) == sorted(scores, reverse=True) and list(ratios) == sorted(ratios)


def test_without_a_head_or_without_room_beside_it_there_is_no_measure():
    noise = np.random.default_rng(0).normal(100, 1, SHAPE).astype(np.float32)
    filled = head()[25:-25, 29:-29, 22:-22]  # the field of view inside the head on every axis
    for volume in (np.zeros(SHAPE, np.float32), noise, filled):
        measure = measure_n2_ghost(volume)
        assert measure.ratio is None and measure.reason, measure
        assert measure.score == 1.0


@pytest.fixture(scope="module")
def scorers():
    return Scorer(ScoringSettings()), Scorer(ScoringSettings(ghost_check=False))


def test_the_score_is_the_lower_of_the_models_and_the_ghost_checks_and_off_means_off(scorers):
    checked, unchecked = scorers
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    clean = checked.score_volume(Volume(head(), (2.0, 2.0, 2.0), affine))
    assert clean.score == clean.model_score and clean.ghost.ratio < NO_EFFECT_BELOW
    ghosted = Volume(n2_ghost(head(), 0.3, axis=2), (2.0, 2.0, 2.0), affine)
    result = checked.score_volume(ghosted)
    assert result.ghost.direction == "superior-inferior"
    assert result.ghost.score < 0.2
    assert result.score == min(result.model_score, result.ghost.score)
    off = unchecked.score_volume(ghosted)
    assert off.ghost is None and off.score == off.model_score == pytest.approx(result.model_score)
