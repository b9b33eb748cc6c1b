"""trainer.patches: random training patches reach every voxel; test patches are the daemon's grid."""

from __future__ import annotations

import numpy as np
import pytest

from qc_daemon.preprocess import extract_patches, patch_grid
from trainer import patches as tp
from trainer.patches import random_patch_origins, sample_patches, volume_score


def test_random_patches_cover_edges():
    shape, size = (40, 37, 33), 32
    covered = np.zeros(shape, bool)
    rng = np.random.default_rng(0)
    origins = random_patch_origins(shape, size, 400, rng)
    for x, y, z in origins:
        assert 0 <= x <= shape[0] - size and 0 <= y <= shape[1] - size and 0 <= z <= shape[2] - size
        covered[x : x + size, y : y + size, z : z + size] = True
    assert covered.all()
    for axis in range(3):  # both extreme origins are drawn
        values = {o[axis] for o in origins}
        assert 0 in values and shape[axis] - size in values


def test_sample_patches_shape_padding_and_content():
    rng = np.random.default_rng(1)
    volume = rng.uniform(0.01, 1, size=(20, 40, 40)).astype(np.float32)
    patches = sample_patches(volume, 32, 9, rng, fill=0.001)
    assert patches.shape == (9, 1, 32, 32, 32) and patches.dtype == np.float32
    assert np.isclose(patches[:, :, :6].max(), 0.001)  # the short axis was padded symmetrically


def test_test_patches_match_the_daemon():
    volume = np.random.default_rng(2).uniform(size=(64, 80, 50)).astype(np.float32)
    ours = tp.test_patches(volume, 32, 16)
    theirs = extract_patches(volume, patch_grid(volume.shape, 32, 16), 32)
    np.testing.assert_array_equal(ours, theirs)
    assert volume_score(np.array([0.2, 1.4])) == pytest.approx(0.8)
    assert volume_score(np.array([1.5, 1.4])) == 1.0


def test_too_small_volume_is_refused():
    with pytest.raises(ValueError, match="pad first"):
        random_patch_origins((10, 40, 40), 32, 1, np.random.default_rng(0))


def test_reorient_randomly_permutes_and_flips_each_patch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 5, 5, 5)).astype(np.float32)
    out = tp.reorient_randomly(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = set()
    for a, b in zip(x[:, 0], out[:, 0], strict=True):
        np.testing.assert_array_equal(np.sort(a.ravel()), np.sort(b.ravel()))  # same voxels, moved
        matches = [
            (perm, flips)
            for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
            for flips in ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))
            if np.array_equal(np.flip(np.transpose(a, perm), flips) if flips else np.transpose(a, perm), b)
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len({perm for perm, _ in seen}) == 6 and len({flips for _, flips in seen}) >= 6
    slices = tp.reorient_randomly(rng.normal(size=(3, 1, 8, 8)).astype(np.float32), rng)
    assert slices.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="cubic"):
        tp.reorient_randomly(rng.normal(size=(2, 1, 4, 5, 6)), rng)
