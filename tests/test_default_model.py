"""The bundled default model on scans from sites and scanners it never saw: it must alert for a scan a
technologist would repeat, and stay silent for a good one.

The scans: the shared human DICOM series (Philips Ingenia Elition X 3D T1 MPRAGE, Siemens Prisma 2D T1 FLASH with
4.8 mm slices), built into volumes by the daemon's own code; neither site is in the training data (MODEL_CARD.md).
The degradations (``degradations.py``) are written with numpy only, independently of ``trainer/artifacts.py``, and
applied on each scan's own grid, as a scanner would make them.
"""

from __future__ import annotations

import time
from copy import deepcopy

import numpy as np
import pytest
from conftest import shared_data
from degradations import MODERATE, NON_DIAGNOSTIC, degrade
from pydicom.uid import generate_uid

from qc_daemon.scorer import Scorer
from qc_daemon.settings import AlertSettings, ScoringSettings
from qc_daemon.volume import Volume

UNSEEN = ["philips_elitionx_t1_mprage_3d", "siemens_prisma_t1_2d_sag"]
THRESHOLD = AlertSettings().threshold


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


@pytest.fixture(scope="module")
def volumes():
    from qc_daemon.cli import _pick_series
    from qc_daemon.series import classify, read_series
    from qc_daemon.volume import build_volume

    out = {}
    for name in UNSEEN:
        folder = shared_data("dicom", name)
        out[name] = build_volume(classify(read_series(name, _pick_series(folder, None)), min_slices=5))
    return out


def _score(scorer, volume: Volume, data: np.ndarray) -> float:
    return scorer.score_volume(Volume(data.astype(np.float32), volume.spacing_mm, volume.affine)).score


@pytest.mark.shared_data
@pytest.mark.parametrize("name", UNSEEN)
def test_clean_scans_from_unseen_sites_do_not_alert(scorer, volumes, name):
    # Issue 10's goal: a clean scan of an unseen site scores above 0.7 (the shipped model: Philips 0.77,
    # Siemens 2D 0.76; the one before it gave the Siemens 2D series 0.59).
    assert _score(scorer, volumes[name], volumes[name].data) > 0.7


@pytest.mark.shared_data
@pytest.mark.parametrize("kind", ["blur", "motion", "noise"])
@pytest.mark.parametrize("name", UNSEEN)
def test_non_diagnostic_scans_alert(scorer, volumes, name, kind):
    volume = volumes[name]
    clean = _score(scorer, volume, volume.data)
    moderate = _score(scorer, volume, degrade(volume.data, kind, MODERATE[kind], volume.spacing_mm))
    severe = _score(scorer, volume, degrade(volume.data, kind, NON_DIAGNOSTIC[kind], volume.spacing_mm))
    assert severe < THRESHOLD, (clean, moderate, severe)
    assert clean > moderate > severe, (clean, moderate, severe)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", UNSEEN)
def test_nyquist_ghosts_lower_the_score_as_they_worsen_and_a_non_diagnostic_one_alerts(scorer, volumes, name):
    """N/2 ghosts from a phase error (in quadrature with the head) along the axis tests/degradations.py picks,
    which on both series puts most of the ghost in the air. The model alone scored a 30 % ghost 0.52-0.58 here
    (MODEL_CARD.md, "N/2 ghosts by direction"); the ghost check (qc_daemon/ghost_check.py) floors the score."""
    volume = volumes[name]
    results = [scorer.score_volume(volume)] + [
        scorer.score_volume(Volume(degrade(volume.data, "ghosting", level, volume.spacing_mm), volume.spacing_mm,
                                   volume.affine))
        for level in (MODERATE["ghosting"], NON_DIAGNOSTIC["ghosting"], 0.5)
    ]
    scores = [r.score for r in results]
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False)) and scores[0] > scores[1], scores
    assert scores[2] < THRESHOLD, scores  # a 30 % ghost alerts (an 8 % one reads 0.45-0.6: near the threshold)
    assert results[0].score == results[0].model_score  # the clean scan: the check changes nothing


@pytest.mark.shared_data
def test_score_says_when_the_ghost_check_lowered_the_models_score(volumes, tmp_path, capsys):
    """`qc-daemon score` on the Philips head with a 30 % superior-inferior ghost, written as NIfTI: the text names
    the model's own score and the ghost's direction; --json carries both."""
    import json

    import nibabel as nib

    from qc_daemon.cli import main

    volume = volumes["philips_elitionx_t1_mprage_3d"]
    ghosted = degrade(volume.data, "ghosting", NON_DIAGNOSTIC["ghosting"], volume.spacing_mm)
    path = tmp_path / "ghosted.nii.gz"
    nib.save(nib.Nifti1Image(ghosted, volume.affine), path)
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["--config", str(config), "score", str(path)]) == 0
    text = capsys.readouterr().out
    assert "lowered from the model's" in text and "along superior-inferior" in text, text
    assert main(["--config", str(config), "score", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["below_threshold"] and out["score"] < out["model_score"]
    assert out["ghost_direction"] == "superior-inferior"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", UNSEEN)
def test_a_k_space_spike_at_the_repeat_level_alerts(scorer, volumes, name):
    """Stripes of 4 % of the p99 (the trainer's repeat level for spikes): the model alone scores them at or above
    the clean scan (MODEL_CARD.md); the spike check floors the score."""
    from degradations import spike

    volume = volumes[name]
    clean = scorer.score_volume(volume)
    result = scorer.score_volume(Volume(spike(volume.data, 0.04).astype(np.float32), volume.spacing_mm, volume.affine))
    assert clean.spike.amplitude is None and clean.score == clean.model_score
    assert result.spike.amplitude is not None and result.score == result.spike.score < THRESHOLD, result.spike


def _noisy_copy(datasets, fraction: float, seed: int = 0):
    """The series as a new series (new UIDs) with Rician noise of ``fraction`` x the series' p99 in every voxel
    (stored values; i.i.d. per voxel, so per slice is the same as on the volume)."""
    rng = np.random.default_rng(seed)
    p99 = float(np.percentile(np.stack([ds.pixel_array for ds in datasets]), 99))
    series_uid = generate_uid()
    out = []
    for ds in datasets:
        copy = deepcopy(ds)  # Dataset.copy() is shallow: it would change the clean series too
        copy.SeriesInstanceUID = series_uid
        copy.SOPInstanceUID = generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        pixels = ds.pixel_array.astype(np.float64)
        noisy = np.sqrt((pixels + rng.normal(0, fraction * p99, pixels.shape)) ** 2
                        + rng.normal(0, fraction * p99, pixels.shape) ** 2)
        info = np.iinfo(ds.pixel_array.dtype)
        copy.PixelData = np.clip(np.round(noisy), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        out.append(copy)
    return out


def _ghosted_copy(datasets, amplitude: float):
    """The series as a new series with an N/2 ghost along the in-plane axis nearest the patient's superior-inferior
    direction, made slice by slice in k-space as a phase error on every other line (ghost / image = tan(phi / 2);
    along one in-plane axis this is the same as on the whole volume)."""
    series_uid = generate_uid()
    out = []
    for ds in datasets:
        row_cosine, column_cosine = np.reshape(np.asarray(ds.ImageOrientationPatient, dtype=float), (2, 3))
        axis = 0 if abs(column_cosine[2]) > abs(row_cosine[2]) else 1  # pixel rows advance along the column cosine
        pixels = ds.pixel_array.astype(np.float64)
        shape = [1, 1]
        shape[axis] = pixels.shape[axis]
        odd = (np.arange(pixels.shape[axis]) % 2 == 1).reshape(shape)
        error = np.where(odd, np.exp(2j * np.arctan(amplitude)), 1.0)
        ghosted = np.abs(np.fft.ifft(np.fft.fft(pixels, axis=axis) * error, axis=axis))
        copy = deepcopy(ds)
        copy.SeriesInstanceUID = series_uid
        copy.SOPInstanceUID = generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        info = np.iinfo(ds.pixel_array.dtype)
        copy.PixelData = np.clip(np.round(ghosted), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        out.append(copy)
    return out


@pytest.mark.shared_data
def test_over_dicom_non_diagnostic_series_alert_and_the_clean_one_does_not(daemon_factory, webhook):
    """The real Philips 3D T1 sent to a running daemon three times: as acquired, with severe noise, and with a
    30 % N/2 ghost along superior-inferior (the direction the model alone misses: MODEL_CARD.md). The webhook gets
    exactly two alerts; the ghost's names the ghost check's direction and a score below the model's own."""
    import pydicom
    from conftest import send_datasets

    folder = shared_data("dicom", "philips_elitionx_t1_mprage_3d")
    clean = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    noisy = _noisy_copy(clean, NON_DIAGNOSTIC["noise"])
    ghosted = _ghosted_copy(clean, NON_DIAGNOSTIC["ghosting"])
    url, received = webhook
    daemon = daemon_factory(alerts={"webhook_url": url, "retry_initial_s": 0.1})
    for series in (clean, noisy, ghosted):
        assert set(send_datasets(series, daemon.port)) == {0}
    assert daemon.wait_idle(300)
    deadline = time.monotonic() + 30
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    alerts = {a["series_instance_uid"]: a for a in received}
    assert len(received) == 2
    assert set(alerts) == {str(noisy[0].SeriesInstanceUID), str(ghosted[0].SeriesInstanceUID)}
    assert alerts[str(noisy[0].SeriesInstanceUID)]["score"] < THRESHOLD
    ghost = alerts[str(ghosted[0].SeriesInstanceUID)]
    assert ghost["score"] < THRESHOLD and ghost["score"] < ghost["model_score"], ghost
    assert ghost["ghost_direction"] == "superior-inferior" and ghost["ghost_ratio"] > 0.1, ghost
