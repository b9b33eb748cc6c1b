"""qc_daemon.iqms on known answers: a 3-tissue head in air with Rician noise of known sigma, degraded by noise,
blur and a bias field; tiny, constant and zero-background volumes give nulls with reasons; real T1 with added
noise moves the metrics the way the learned score moves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from conftest import shared_data
from qc_daemon import iqms
from qc_daemon.iqms import IQM_NAMES, compute_iqms

SPACING = (1.5, 1.5, 1.5)
CSF, GM, WM = 150.0, 400.0, 600.0  # T1 order: CSF darkest, WM brightest
SIGMA = 20.0
TOLERANCE = 0.10  # SNR, CNR and the noise estimate agree with their known values within 10 %


def head(shape=(80, 96, 80)) -> np.ndarray:
    """Noise-free head in air: nested ellipsoids, WM core inside GM inside a CSF shell."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    v = np.zeros(shape)
    v[r < 0.8] = CSF
    v[r < 0.7] = GM
    v[r < 0.45] = WM
    return v


def rician(volume: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """The magnitude of the volume plus complex Gaussian noise of ``sigma`` per channel (air becomes Rayleigh)."""
    rng = np.random.default_rng(seed)
    real = volume + rng.normal(0, sigma, volume.shape)
    imaginary = rng.normal(0, sigma, volume.shape)
    return np.hypot(real, imaginary).astype(np.float32)


@pytest.fixture(scope="module")
def clean():
    return compute_iqms(rician(head(), SIGMA), SPACING)


def test_every_metric_is_computed_on_a_head_in_air(clean):
    assert list(clean.values) == list(IQM_NAMES)
    assert clean.errors == {}
    assert all(math.isfinite(v) for v in clean.values.values())


def test_snr_cnr_and_noise_match_the_known_answer(clean):
    values = clean.values
    assert values["noise_sigma"] == pytest.approx(SIGMA, rel=TOLERANCE)
    for tissue, mean in (("csf", CSF), ("gm", GM), ("wm", WM)):
        assert values[f"snr_{tissue}"] == pytest.approx(mean / SIGMA, rel=TOLERANCE)
        assert values[f"snrd_{tissue}"] == pytest.approx(mean / SIGMA, rel=TOLERANCE)
    assert values["snr_total"] == pytest.approx((CSF + GM + WM) / 3 / SIGMA, rel=TOLERANCE)
    sigma_air = SIGMA * iqms.DIETRICH_FACTOR  # the standard deviation of Rayleigh air
    assert values["cnr"] == pytest.approx((WM - GM) / math.sqrt(sigma_air**2 + 2 * SIGMA**2), rel=TOLERANCE)
    assert values["cjv"] == pytest.approx(2 * SIGMA / (WM - GM), rel=TOLERANCE)
    assert values["wm2max"] == pytest.approx(WM / np.percentile(rician(head(), SIGMA), 99.95), rel=TOLERANCE)
    assert values["inu_range"] < 0.05  # no bias field


def test_more_noise_lowers_snr_cnr_fber_and_raises_cjv_efc(clean):
    noisy = compute_iqms(rician(head(), 2 * SIGMA, seed=1), SPACING).values
    for name in ("snr_total", "snrd_total", "cnr", "fber"):
        assert noisy[name] < clean.values[name], name
    for name in ("cjv", "efc", "noise_sigma"):
        assert noisy[name] > clean.values[name], name
    assert noisy["snr_wm"] == pytest.approx(WM / (2 * SIGMA), rel=TOLERANCE)


def test_blur_raises_cjv_and_a_bias_field_raises_inu_range(clean):
    blurred = compute_iqms(rician(ndimage.gaussian_filter(head(), 3.0), SIGMA), SPACING).values
    assert blurred["cjv"] > clean.values["cjv"]
    x = np.linspace(0.7, 1.3, head().shape[0])[:, None, None]  # +-30 % from left to right
    head_sized = (3.0, 3.0, 3.0)  # WM 11 cm across: the field is smoothed over 2 cm
    flat = compute_iqms(rician(head(), SIGMA), head_sized).values
    biased = compute_iqms(rician(head() * x, SIGMA), head_sized).values
    assert biased["inu_range"] > 0.1 > 0.01 > flat["inu_range"]
    assert biased["cjv"] > clean.values["cjv"]


def test_ghosting_raises_efc(clean):
    v = head()
    ghost = v + 0.3 * np.roll(v, v.shape[1] // 2, axis=1)  # an N/2 ghost along the phase axis
    assert compute_iqms(rician(ghost, SIGMA), SPACING).values["efc"] > clean.values["efc"]


@pytest.mark.parametrize(
    ("volume", "reason"),
    [
        (np.ones((4, 40, 40), np.float32), "too small"),
        (np.full((32, 32, 32), 7.0, np.float32), "constant"),
        (np.zeros((32, 32, 32), np.float32), "constant"),
    ],
    ids=["thin", "constant", "zero"],
)
def test_a_volume_without_a_head_gives_nulls_with_reasons(volume, reason):
    report = compute_iqms(volume, SPACING)
    assert list(report.values) == list(IQM_NAMES)
    nulls = [name for name, value in report.values.items() if value is None]
    assert set(nulls) == set(report.errors)
    assert set(nulls) >= set(IQM_NAMES) - {"efc"}
    assert reason in report.errors["snr_total"]


def test_a_field_of_view_inside_the_head_has_no_air_metrics():
    v = head()
    v[v == 0] = CSF  # no air anywhere: tissue fills the field of view
    report = compute_iqms(rician(v, SIGMA), SPACING)
    for name in ("noise_sigma", "snrd_total", "cnr"):
        assert report.values[name] is None and "not dark" in report.errors[name], name


def test_a_zero_filled_background_gives_no_noise_estimate_but_keeps_the_rest():
    v = rician(head(), SIGMA)
    v[head() == 0] = 0.0  # background suppressed by the scanner
    report = compute_iqms(v, SPACING)
    assert report.values["noise_sigma"] is None and "zero-filled" in report.errors["noise_sigma"]
    assert report.values["fber"] is None and "zero" in report.errors["fber"]
    assert report.values["cjv"] == pytest.approx(2 * SIGMA / (WM - GM), rel=TOLERANCE)


def test_otsu_separates_two_populations():
    values = np.concatenate([np.full(1000, 10.0), np.full(300, 50.0)])
    assert 10.0 <= iqms.otsu_threshold(values) < 50.0


@pytest.mark.shared_data
def test_noise_on_a_real_t1_lowers_snr_and_raises_cjv():
    """Agreement in direction with the learned score (which falls with noise: MODEL_CARD.md), on real data."""
    import nibabel as nib

    image = nib.load(shared_data("t1w", "ds000011", "sub-01_T1w.nii.gz"))
    data = np.asarray(image.dataobj, dtype=np.float32)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    clean = compute_iqms(data, spacing)
    sigma = 0.05 * float(np.percentile(data, 99))
    noisy = compute_iqms(rician(data, sigma, seed=3), spacing)
    assert clean.errors.keys() <= {"noise_sigma", "snrd_csf", "snrd_gm", "snrd_wm", "snrd_total", "cnr", "fber"}
    assert noisy.values["snr_total"] < clean.values["snr_total"]
    assert noisy.values["cjv"] > clean.values["cjv"]
    assert noisy.values["efc"] > clean.values["efc"]


def test_a_noise_free_tissue_has_no_snr_but_keeps_its_other_metrics():
    v = head()
    v[v == 0] = np.random.default_rng(0).rayleigh(SIGMA, size=int((v == 0).sum()))  # noise in the air only
    report = compute_iqms(v.astype(np.float32), SPACING)
    assert report.values["snr_wm"] is None and "noise-free" in report.errors["snr_wm"]
    assert report.values["snr_total"] is None and "noise-free" in report.errors["snr_total"]
    assert report.values["cjv"] == 0.0 and report.values["noise_sigma"] == pytest.approx(SIGMA, rel=TOLERANCE)
