"""The bundled default model on real T1 scans of held-out subjects: the score must mean something.

Subjects ds000011/03 and ds002748/09 were held out of the default model's training (MODEL_CARD.md). The
degradations here are written with numpy/scipy, independently of the trainer's TorchIO transforms.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import shared_data
from scipy import ndimage

from qc_daemon.scorer import Scorer
from qc_daemon.settings import ScoringSettings
from qc_daemon.volume import Volume, load_nifti

HELD_OUT = ["ds000011/sub-03_T1w.nii.gz", "ds002748/sub-09_T1w.nii.gz"]


def _require_trained(scorer: Scorer) -> None:
    # ``python -m export bundle`` writes an untrained placeholder (calibration "untrained"): never ship one.
    assert scorer.info.calibration.label_name != "untrained", f"{scorer.path} is the untrained placeholder"
    assert not scorer.info.training_data.startswith("none"), f"{scorer.path}: {scorer.info.training_data}"


def test_bundled_model_is_trained():
    _require_trained(Scorer(ScoringSettings()))


@pytest.fixture(scope="module")
def scorer():
    scorer = Scorer(ScoringSettings())
    _require_trained(scorer)
    return scorer


def _score(scorer, volume: Volume, data: np.ndarray) -> float:
    return scorer.score_volume(Volume(data.astype(np.float32), volume.spacing_mm, volume.affine)).score


def _rician(data: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", HELD_OUT)
def test_clean_scans_score_high_and_noise_lowers_the_score(scorer, name):
    volume = load_nifti(shared_data("t1w", name))
    rng = np.random.default_rng(0)
    reference = np.percentile(volume.data, 99)
    scores = [_score(scorer, volume, volume.data)]
    scores += [_score(scorer, volume, _rician(volume.data, level * reference, rng)) for level in (0.05, 0.1, 0.2)]
    assert scores[0] >= 0.9
    assert all(a > b for a, b in itertools.pairwise(scores)), scores


@pytest.mark.shared_data
@pytest.mark.parametrize("name", HELD_OUT)
def test_blur_lowers_the_score_as_it_worsens(scorer, name):
    volume = load_nifti(shared_data("t1w", name))
    scores = [_score(scorer, volume, volume.data)]
    scores += [_score(scorer, volume, ndimage.gaussian_filter(volume.data, sigma)) for sigma in (1.0, 2.0, 3.0)]
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    assert scores[-1] < scores[0] - 0.3


def _motion(data: np.ndarray, shift_mm: float, still_band: float, spacing_mm) -> np.ndarray:
    """Rigid motion by k-space line mixing, without interpolation: lines of the second (phase-encode) axis
    outside a central band of half-width ``still_band`` (fraction of the lines) come from a copy translated by
    ``shift_mm`` along every axis (a phase ramp), the central band from the unmoved head."""
    k = np.fft.fftn(data)
    freqs = np.meshgrid(*[np.fft.fftfreq(n, d=s) for n, s in zip(data.shape, spacing_mm, strict=True)], indexing="ij")
    moved = k * np.exp(-2j * np.pi * sum(f * shift_mm for f in freqs))
    line = np.abs(np.fft.fftfreq(data.shape[1]))  # 0 at the centre line, 0.5 at the edge
    outside = (line > still_band)[None, :, None]
    return np.abs(np.fft.ifftn(np.where(outside, moved, k)))


@pytest.mark.shared_data
@pytest.mark.parametrize("name", HELD_OUT)
def test_motion_lowers_the_score_as_it_worsens(scorer, name):
    volume = load_nifti(shared_data("t1w", name))
    scores = [_score(scorer, volume, volume.data)]
    scores += [
        _score(scorer, volume, _motion(volume.data, shift, band, volume.spacing_mm))
        for shift, band in ((2.0, 0.2), (4.0, 0.12), (8.0, 0.06), (12.0, 0.04))
    ]
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    # The label (SSIM) of the worst level is 0.43 (ds000011 sub-03) / 0.70 (ds002748 sub-09), a calibrated score
    # of ~0.0 / ~0.47; the model, trained on TorchIO's motion, scores it ~0.69 / ~0.79: motion from another
    # simulator is under-reported (MODEL_CARD.md, sanity check), but it must still be seen.
    assert scores[-1] < scores[0] - 0.15, scores


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["philips_elitionx_t1_mprage_3d", "siemens_prisma_t1_2d_sag"])
def test_real_clinical_scans_from_other_sites_do_not_alert(scorer, name):
    """Good clinical T1 scans from scanners and sequences the model never saw must not raise a false alarm."""
    from qc_daemon.cli import _pick_series
    from qc_daemon.series import classify, read_series
    from qc_daemon.settings import AlertSettings
    from qc_daemon.volume import build_volume

    folder = shared_data("dicom", name)
    volume = build_volume(classify(read_series(name, _pick_series(folder, None)), min_slices=5))
    assert scorer.score_volume(volume).score >= AlertSettings().threshold
