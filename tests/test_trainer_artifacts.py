"""trainer.artifacts and trainer.labels on a synthetic phantom: reproducible, graded, label falls with severity."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("torchio")

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
    rng1, rng2 = np.random.default_rng(0), np.random.default_rng(0)
    t = artifacts.RandomArtifact()
    o1, r1 = t(volume, SPACING, rng1)
    o2, r2 = t(volume, SPACING, rng2)
    np.testing.assert_array_equal(o1, o2)
    assert [x.to_dict() for x in r1] == [x.to_dict() for x in r2]


def test_head_mask_covers_the_phantom(volume):
    mask = head_mask(volume)
    assert mask.sum() == pytest.approx((volume > 0).sum(), rel=0.1)


def test_classical_iqms_react_to_noise(volume):
    from qc_daemon.model_contract import Normalisation
    from qc_daemon.preprocess import normalise
    from trainer.baseline import IQM_NAMES, classical_iqms

    clean = classical_iqms(normalise(volume, Normalisation()))
    noisy = classical_iqms(normalise(artifacts.degrade(volume, SPACING, "noise", 4, seed=0)[0], Normalisation()))
    assert set(clean) == set(IQM_NAMES) and all(np.isfinite(v) for v in clean.values())
    assert noisy["snr_wm"] < clean["snr_wm"] and noisy["cjv"] > clean["cjv"]


def test_motion_keeps_the_unmoved_pose_in_the_k_space_centre():
    for seed in range(20):
        widths = []
        for severity in range(1, artifacts.MAX_SEVERITY + 1):
            t1, t2 = artifacts.draw_params("motion", severity, seed)["times"]
            assert t1 < 0.5 < t2, (severity, seed, t1, t2)
            widths.append(t2 - t1)
        # same seed, worse scan: a narrower still band around the k-space centre
        assert all(b < a for a, b in itertools.pairwise(widths)), (seed, widths)


def test_motion_label_is_set_by_severity_not_by_the_seed(volume):
    """Every seed's motion at severity s+1 is worse than every seed's at s, so the label is learnable blind.

    (The earlier design, movements anywhere around the k-space centre, failed this: a moved k-space centre
    displaces the image, and how much it happened to move mattered more than the severity.)
    """
    ranges = []
    for severity in range(1, artifacts.MAX_SEVERITY + 1):
        labels = [
            quality_label(volume, artifacts.degrade(volume, SPACING, "motion", severity, seed)[0]) for seed in range(4)
        ]
        ranges.append((min(labels), max(labels)))
    assert all(worse[1] < better[0] for better, worse in itertools.pairwise(ranges)), ranges
