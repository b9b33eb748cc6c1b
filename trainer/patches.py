"""Patches for training (random) and for testing (the daemon's grid, via ``qc_daemon.preprocess``).

Training follows the paper: every step draws ``n`` (9) random 96^3 patches from a volume, all carrying the
volume's label. Origins are uniform over every position where a whole patch fits, edges included, so every
voxel can be seen. Test time uses exactly the daemon's patching (:func:`qc_daemon.preprocess.patch_grid`:
origins every ``step`` voxels, the last one flush with the edge) and the volume score is the mean of the
patch scores, clipped to [0, 1], as the model contract prescribes.

The 2D ablation works on axial slices instead (:func:`trainer.model.volume_to_slices`), padded to a square
of ``slice_size(patch_size)`` = 2 * patch_size pixels: 192 px at 2 mm is the paper's 384 px at 1 mm, the same
field of view.
"""

from __future__ import annotations

import numpy as np

from qc_daemon.preprocess import extract_patches, pad_to_min_size, patch_grid


def slice_size(patch_size: int) -> int:
    """Side of the square 2D slices used by the 2D ablation (same field of view as the paper's 384 px at 1 mm)."""
    return 2 * patch_size


def random_patch_origins(
    shape: tuple[int, ...], size: int, n: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """``n`` origins drawn uniformly from 0..extent-size on each axis (inclusive, so edges are reachable)."""
    if any(extent < size for extent in shape):
        raise ValueError(f"volume {shape} is smaller than the patch size {size}: pad first")
    return [tuple(int(rng.integers(0, extent - size + 1)) for extent in shape) for _ in range(n)]  # type: ignore[misc]


def sample_patches(
    volume: np.ndarray, size: int, n: int, rng: np.random.Generator, fill: float | None = None
) -> np.ndarray:
    """(n, 1, size, size, size) float32 random patches; a volume smaller than ``size`` is padded with ``fill``."""
    volume = pad_to_min_size(volume, size, fill=float(volume.min()) if fill is None else fill)
    return extract_patches(np.asarray(volume, dtype=np.float32), random_patch_origins(volume.shape, size, n, rng), size)


def reorient_randomly(inputs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each input (N, 1, *spatial), cubic or square, gets a random permutation of its spatial axes and random flips.

    Label-preserving: the SSIM label is computed with an isotropic window on isotropic voxels, so it is the same
    for any permutation and flip of the whole volume. It moves the artifacts' directions around (a scanner's phase
    encoding can be any axis) and keeps the
    network from learning what a clean head *looks like where* in the 21 training subjects: without it a clean
    held-out scan presented with two axes swapped scored 0.54-0.84 instead of 0.97-0.99.
    """
    spatial = inputs.ndim - 2
    if len(set(inputs.shape[2:])) != 1:
        raise ValueError(f"reorienting needs cubic patches or square slices, got {inputs.shape[2:]}")
    out = np.empty_like(inputs)
    for i, x in enumerate(inputs[:, 0]):
        x = np.transpose(x, rng.permutation(spatial))
        flips = tuple(axis for axis in range(spatial) if rng.random() < 0.5)
        out[i, 0] = np.flip(x, flips) if flips else x
    return out


def test_patches(volume: np.ndarray, size: int, step: int, fill: float | None = None) -> np.ndarray:
    """Every patch of the daemon's grid, (N, 1, size, size, size) float32."""
    volume = pad_to_min_size(volume, size, fill=float(volume.min()) if fill is None else fill)
    return extract_patches(np.asarray(volume, dtype=np.float32), patch_grid(volume.shape, size, step), size)


def sample_slices(volume: np.ndarray, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 1, size, size) random axial slices (2D ablation), drawn without replacement when possible."""
    from trainer.model import volume_to_slices

    slices = volume_to_slices(np.asarray(volume, dtype=np.float32), size=size)
    idx = rng.choice(slices.shape[0], size=n, replace=slices.shape[0] < n)
    return slices[np.sort(idx)]


def test_slices(volume: np.ndarray, size: int, stride: int = 2) -> np.ndarray:
    """Every ``stride``-th axial slice (2D ablation) as (N, 1, size, size)."""
    from trainer.model import volume_to_slices

    return volume_to_slices(np.asarray(volume, dtype=np.float32), size=size)[::stride]


def volume_score(patch_scores: np.ndarray) -> float:
    """The contract's volume score: mean of the patch scores, clipped to [0, 1]."""
    return float(np.clip(np.mean(patch_scores), 0.0, 1.0))
