"""The bundled default model on real T1 scans of held-out subjects: the score must mean something.

Subjects ds000011/03 and ds002748/09 were held out of the default model's training (MODEL_CARD.md). The
degradations here are written with numpy/scipy, independently of the trainer's TorchIO transforms.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_data
from scipy import ndimage

from qc_daemon.scorer import Scorer
from qc_daemon.settings import ScoringSettings
from qc_daemon.volume import Volume, load_nifti

pytestmark = pytest.mark.shared_data
HELD_OUT = ["ds000011/sub-03_T1w.nii.gz", "ds002748/sub-09_T1w.nii.gz"]


@pytest.fixture(scope="module")
def scorer():
    scorer = Scorer(ScoringSettings())
    if scorer.info.calibration.label_name == "untrained":
        pytest.skip("the bundled model is the untrained placeholder")
    return scorer


def _score(scorer, volume: Volume, data: np.ndarray) -> float:
    return scorer.score_volume(Volume(data.astype(np.float32), volume.spacing_mm, volume.affine)).score


def _rician(data: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)


@pytest.mark.parametrize("name", HELD_OUT)
def test_clean_scans_score_high_and_noise_lowers_the_score(scorer, name):
    volume = load_nifti(shared_data("t1w", name))
    rng = np.random.default_rng(0)
    reference = np.percentile(volume.data, 99)
    scores = [_score(scorer, volume, volume.data)]
    scores += [_score(scorer, volume, _rician(volume.data, level * reference, rng)) for level in (0.05, 0.1, 0.2)]
    assert scores[0] >= 0.9
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores


@pytest.mark.parametrize("name", HELD_OUT)
def test_blur_lowers_the_score_as_it_worsens(scorer, name):
    volume = load_nifti(shared_data("t1w", name))
    scores = [_score(scorer, volume, volume.data)]
    scores += [_score(scorer, volume, ndimage.gaussian_filter(volume.data, sigma)) for sigma in (1.0, 2.0, 3.0)]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[-1] < scores[0] - 0.3
