"""The spike check (qc_daemon/spike_check.py) and how it floors the score."""

from __future__ import annotations

import numpy as np
import pytest

from qc_daemon.scorer import Scorer
from qc_daemon.settings import ScoringSettings
from qc_daemon.spike_check import AMPLITUDE_TO_SCORE, MIN_PROMINENCE, SpikeMeasure, measure_spike
from qc_daemon.volume import Volume

SHAPE = (128, 144, 112)  # 1.5 mm voxels


def head(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A head in air with some texture (so its spectrum is not an ellipsoid's alone) and Rician noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    rng = np.random.default_rng(seed)
    texture = 40.0 * np.sin(9 * grid[0] + 3 * grid[1] ** 2) * np.cos(7 * grid[2])
    v = np.select([r < 0.45, r < 0.7, r < 0.8], [600.0 + texture, 400.0 + texture, 150.0], 0.0)
    return np.hypot(v + rng.normal(0, 8.0, shape), rng.normal(0, 8.0, shape)).astype(np.float32)


def spiked(volume: np.ndarray, amplitude: float, position=(0.17, -0.23, 0.11)) -> np.ndarray:
    """One corrupted k-space sample: stripes of ``amplitude`` x the head's p99 (written here with numpy alone)."""
    k = np.fft.fftn(volume)
    where = tuple(int(round(p * n)) % n for p, n in zip(position, volume.shape, strict=True))
    k[where] += amplitude * np.percentile(volume[volume > 0.3 * volume.max()], 99) * volume.size
    return np.abs(np.fft.ifftn(k)).astype(np.float32)


def test_a_clean_head_has_no_spike():
    measure = measure_spike(head())
    assert measure.prominence is not None and measure.prominence < MIN_PROMINENCE / 1.5, measure
    assert measure.amplitude is None and measure.score == 1.0


@pytest.mark.parametrize("position", [(0.17, -0.23, 0.11), (-0.06, 0.3, -0.2), (0.27, 0.08, 0.25)])
def test_the_amplitude_follows_the_spike(position):
    amplitudes = []
    for amplitude in (0.01, 0.04, 0.1):
        measure = measure_spike(spiked(head(), amplitude, position))
        assert measure.prominence >= MIN_PROMINENCE and measure.amplitude is not None, (amplitude, measure)
        assert 0.6 * amplitude < measure.amplitude < 1.6 * amplitude, (amplitude, measure)
        amplitudes.append(measure.amplitude)
    assert amplitudes == sorted(amplitudes)


def test_the_score_follows_the_trainers_spike_severities():
    amplitudes, scores = zip(*AMPLITUDE_TO_SCORE, strict=True)
    assert SpikeMeasure(30.0, 0.005).score == SpikeMeasure(5.0, None).score == 1.0
    assert SpikeMeasure(30.0, 0.018).score == pytest.approx(0.65)  # what a severity 2 spike (2 %) reads
    assert SpikeMeasure(30.0, 0.035).score == pytest.approx(0.3)  # severity 3 (4 %): a scan to repeat
    assert SpikeMeasure(30.0, 0.5).score == 0.0
    assert list(scores) == sorted(scores, reverse=True) and list(amplitudes) == sorted(amplitudes)


def test_what_cannot_be_measured_says_why_and_changes_nothing():
    for volume in (np.zeros(SHAPE, np.float32), np.ones((20, 20, 20), np.float32), np.ones((64, 64), np.float32)):
        measure = measure_spike(volume)
        assert measure.amplitude is None and measure.reason and measure.score == 1.0, measure


def test_the_score_is_the_lowest_of_the_models_and_the_checks_and_off_means_off():
    checked, unchecked = Scorer(ScoringSettings()), Scorer(ScoringSettings(spike_check=False))
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    clean = checked.score_volume(Volume(head(), (1.5, 1.5, 1.5), affine))
    assert clean.spike.amplitude is None and clean.score == min(clean.model_score, clean.ghost.score)
    volume = Volume(spiked(head(), 0.08), (1.5, 1.5, 1.5), affine)
    result = checked.score_volume(volume)
    assert result.spike.score < 0.1
    assert result.score == min(result.model_score, result.ghost.score, result.spike.score)
    off = unchecked.score_volume(volume)
    assert off.spike is None and off.model_score == pytest.approx(result.model_score)
