"""trainer.artifacts, trainer.acquisition and trainer.labels on a synthetic phantom: reproducible, graded,
label falls with severity, artifacts live on the scan's own grid."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from scipy import ndimage

from trainer import artifacts
from trainer.labels import head_mask, quality_label

SPACING = (2.0, 2.0, 2.0)


def phantom(shape=(40, 48, 40), seed=0) -> np.ndarray:
    """A head-like phantom: an ellipsoid 'scalp', darker 'brain' with bright 'white matter' and texture."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5)
    texture /= np.abs(texture).max()
    v = np.where(r < 0.85, 400.0, 0.0)
    v = np.where(r < 0.75, 600.0 + 150.0 * texture, v)
    v = np.where((r < 0.45) & (texture > 0), 900.0, v)
    return v.astype(np.float32)


@pytest.fixture(scope="module")
def volume():
    return phantom()


def test_severity_zero_is_identity_and_label_is_one(volume):
    for kind in artifacts.KINDS:
        out, record = artifacts.degrade(volume, SPACING, kind, 0, seed=1)
        np.testing.assert_array_equal(out, volume)
        assert record.severity == 0
    assert quality_label(volume, volume.copy()) == 1.0


@pytest.mark.parametrize("kind", artifacts.KINDS)
def test_label_falls_with_severity(volume, kind):
    labels = [
        quality_label(volume, artifacts.degrade(volume, SPACING, kind, s, seed=5)[0])
        for s in range(artifacts.MAX_SEVERITY + 1)
    ]
    assert labels[0] == 1.0
    assert all(b < a for a, b in itertools.pairwise(labels)), (kind, labels)
    assert labels[-1] < 0.99, (kind, labels)


def test_random_half_is_reproducible_and_recorded(volume):
    for kind in artifacts.KINDS:
        p1 = artifacts.draw_params(kind, 3, seed=11)
        assert p1 == artifacts.draw_params(kind, 3, seed=11)
        json.dumps(p1)  # JSON-able, so it can go in the manifest
        a = artifacts.apply_params(volume, SPACING, kind, p1)
        b = artifacts.apply_params(volume, SPACING, kind, json.loads(json.dumps(p1)))
        np.testing.assert_array_equal(a, b)
    assert artifacts.draw_params("motion", 3, 1) != artifacts.draw_params("motion", 3, 2)


def test_severity_table_is_explicit_and_increasing():
    for kind in artifacts.KINDS:
        table = artifacts.SEVERITY_TABLE[kind]
        assert len(table) == artifacts.MAX_SEVERITY + 1 and table[0] == 0.0
        assert all(b > a for a, b in itertools.pairwise(table))
    with pytest.raises(ValueError, match="unknown artifact kind"):
        artifacts.draw_params("zipper", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        artifacts.draw_params("noise", 9, 0)


def test_mixtures_and_random_transform(volume):
    parts = artifacts.draw_mixture(seed=3)
    assert 2 <= len(parts) <= 3 and len({p[0] for p in parts}) == len(parts)
    out, records = artifacts.degrade_mixture(volume, SPACING, parts)
    assert [r.kind for r in records] == sorted([p[0] for p in parts], key=artifacts.APPLY_ORDER.index)
    assert quality_label(volume, out) < 1.0
    again, _ = artifacts.degrade_mixture(volume, SPACING, parts)
    np.testing.assert_array_equal(out, again)


def test_head_mask_covers_the_phantom(volume):
    mask = head_mask(volume)
    assert mask.sum() == pytest.approx((volume > 0).sum(), rel=0.1)


def test_classical_iqms_react_to_noise(volume):
    from qc_daemon.model_contract import Normalisation
    from qc_daemon.preprocess import normalise
    from trainer.baseline import IQM_NAMES, classical_iqms

    scan = volume + np.random.default_rng(1).normal(0, 5.0, volume.shape).astype(np.float32)  # a little noise
    clean = classical_iqms(normalise(scan, Normalisation()), SPACING)
    noisy = classical_iqms(normalise(artifacts.degrade(scan, SPACING, "noise", 4, seed=0)[0], Normalisation()), SPACING)
    assert set(clean) == set(IQM_NAMES) and "hfe" in clean
    # Normalisation clips the air to one constant: no noise to measure there (NaN); every other metric is computed.
    assert {name for name, v in clean.items() if not np.isfinite(v)} <= {"noise_sigma", "snrd_csf", "snrd_gm",
                                                                          "snrd_wm", "snrd_total", "cnr"}
    assert noisy["snr_wm"] < clean["snr_wm"] and noisy["cjv"] > clean["cjv"]


def test_motion_keeps_the_pose_of_the_k_space_centre(volume):
    """The shot holding the k-space centre is the reference pose, so the head is not displaced (a displacement
    would be measured by the full-reference label, yet no blind model can see it)."""
    largest_voxels = artifacts.magnitude("motion", 5) / SPACING[0]
    for seed in range(5):
        moved, _ = artifacts.degrade(volume, SPACING, "motion", 5, seed)
        centre = np.array(ndimage.center_of_mass(volume))
        shift = np.abs(np.array(ndimage.center_of_mass(moved)) - centre).max()
        assert shift < 0.3 * largest_voxels, (seed, shift)


def test_motion_label_is_set_by_severity_more_than_by_the_seed(volume):
    means = []
    for severity in range(1, artifacts.MAX_SEVERITY + 1):
        labels = [
            quality_label(volume, artifacts.degrade(volume, SPACING, "motion", severity, seed)[0]) for seed in range(4)
        ]
        means.append(np.mean(labels))
        assert np.std(labels) < 0.1, (severity, labels)
    assert all(b < a for a, b in itertools.pairwise(means)), means


def test_artifacts_act_on_the_native_grid_along_the_phase_encode_axis(volume):
    """A ghost on one axis moves intensity along that axis only; blur is set in mm, not voxels."""
    ghost = artifacts.apply_params(volume, SPACING, "ghosting", {"axis": 1, "period": 2, "amplitude": 0.3})
    empty_rows = volume.sum(axis=(1, 2)) == 0  # slabs along axis 0 outside the head stay empty
    assert np.allclose(ghost[empty_rows], 0, atol=1e-3 * volume.max())
    assert ghost[:, :3].sum() > volume[:, :3].sum() + 1  # the head's copy shifted by N/2 on axis 1
    fine = artifacts.apply_params(volume, (1.0, 1.0, 1.0), "blur", {"sigma_mm": 2.0})
    coarse = artifacts.apply_params(volume, (2.0, 2.0, 2.0), "blur", {"sigma_mm": 2.0})
    assert quality_label(volume, fine) < quality_label(volume, coarse)  # 2 mm: 2 voxels on the 1 mm grid, 1 on 2 mm


def test_reacquisition_identity_and_thick_slices(volume):
    from trainer.acquisition import IDENTITY, Acquisition, acquire, draw_acquisition

    same, spacing = acquire(volume, (1.0, 1.0, 1.0), IDENTITY)
    np.testing.assert_array_equal(same, volume)
    assert spacing == (1.0, 1.0, 1.0)
    thick, spacing = acquire(volume, (1.0, 1.0, 1.0), Acquisition(thick_axis=2, thick_mm=4.0))
    assert thick.shape[:2] == volume.shape[:2] and thick.shape[2] == volume.shape[2] // 4
    assert spacing[2] == pytest.approx(4.0) and spacing[:2] == (1.0, 1.0)
    draws = [draw_acquisition(seed, (1.0, 1.0, 1.0)) for seed in range(40)]
    assert draws[3] == draw_acquisition(3, (1.0, 1.0, 1.0))
    assert any(d.thick_axis >= 0 for d in draws) and any(d.curve for d in draws)
    for d in draws:
        if d.curve:
            assert all(b >= a for a, b in itertools.pairwise(d.curve)), d.curve  # tissue order kept
    # a 2 mm scan is never "re-acquired" at 2.5 mm slices: too close to what it already is
    assert all(d.thick_axis < 0 for d in (draw_acquisition(s, (2.0, 2.0, 2.0)) for s in range(40)) if d.thick_mm < 3.0)


def test_reacquisition_can_put_air_around_the_head(volume):
    """A field-of-view margin pads with air before anything else, so an N/2 ghost can fall outside the head; no
    margin keeps the draws (and the manifests of existing caches) as they were."""
    from trainer.acquisition import Acquisition, acquire, draw_acquisition

    padded, spacing = acquire(volume, (1.0, 1.0, 1.0), Acquisition(margin=((0.0, 0.0), (0.5, 0.5), (0.0, 0.0))))
    n = volume.shape[1]
    assert padded.shape == (volume.shape[0], 2 * n, volume.shape[2]) and spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(padded[:, n // 2 : n // 2 + n], volume)
    assert not padded[:, : n // 2].any() and not padded[:, n // 2 + n :].any()
    ghost = artifacts.apply_params(padded, SPACING, "ghosting", {"axis": 1, "period": 2, "amplitude": 0.3})
    assert ghost[:, : n // 2].sum() > 0.1 * 0.3 * volume.sum()  # the head's N/2 copy, now partly in the air
    for seed in range(20):
        plain, wide = draw_acquisition(seed, (1.0, 1.0, 1.0)), draw_acquisition(seed, (1.0, 1.0, 1.0), max_margin=0.2)
        assert "margin" not in plain.to_dict() and wide.to_dict()["margin"] == [list(m) for m in wide.margin]
        assert Acquisition(**{**wide.__dict__, "margin": plain.margin}) == plain  # every other draw unchanged
        assert all(0.0 <= side <= 0.2 for m in wide.margin for side in m)
    margins = [draw_acquisition(seed, (1.0, 1.0, 1.0), max_margin=0.2).margin for seed in range(20)]
    assert any(side > 0 for margin in margins for axis in margin for side in axis)


def test_phase_error_ghost_has_the_asked_amplitude_in_quadrature(volume):
    """An N/2 ghost from a phase error: outside the head the ghost is ``amplitude`` times the image (its copy half
    a field of view away), inside the head image and ghost add in quadrature, unlike an amplitude error."""
    n = volume.shape[1]
    half = np.zeros_like(volume)
    half[:, : n // 2 - 6] = volume[:, : n // 2 - 6]  # a head that leaves its N/2 copy's place empty
    params = {"axis": 1, "period": 2, "amplitude": 0.3}
    phase = artifacts.apply_params(half, SPACING, "ghosting", {**params, "phase_error": True})
    amplitude = artifacts.apply_params(half, SPACING, "ghosting", params)
    shifted = np.roll(half, n // 2, axis=1)
    ghost_zone = (shifted > 0) & (half == 0)
    ratio = phase[ghost_zone] / shifted[ghost_zone]
    image_zone = half > 0
    image_ratio = phase[image_zone] / half[image_zone]
    assert np.median(ratio / image_ratio) == pytest.approx(0.3, rel=0.02)
    assert np.median(image_ratio) == pytest.approx(np.cos(np.arctan(0.3)), rel=0.02)  # the image loses cos(phi/2)
    assert not np.allclose(phase, amplitude, atol=1e-2 * volume.max())
    drawn = [artifacts.draw_params("ghosting", 3, seed) for seed in range(60)]
    assert any(p["phase_error"] for p in drawn) and any(p["period"] == 2 and not p["phase_error"] for p in drawn)
    assert not any(p["phase_error"] for p in drawn if p["period"] != 2)


def test_contrast_curve_strength_blends_with_the_scans_own_contrast(volume):
    from trainer.acquisition import Acquisition, acquire, draw_acquisition

    flat = (0.0, 0.9, 0.95, 0.97, 0.98, 0.99, 1.0)  # a curve that nearly erases grey/white contrast
    full, _ = acquire(volume, SPACING, Acquisition(curve=flat))
    none, _ = acquire(volume, SPACING, Acquisition(curve=flat, curve_strength=0.0))
    half, _ = acquire(volume, SPACING, Acquisition(curve=flat, curve_strength=0.5))
    np.testing.assert_allclose(none, volume, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(half, (full + none) / 2, rtol=1e-4, atol=1e-2)
    strengths = [draw_acquisition(seed, (1.0, 1.0, 1.0)).curve_strength for seed in range(40)]
    assert min(strengths) >= 0.25 and max(strengths) <= 1.0 and len(set(strengths)) > 10
