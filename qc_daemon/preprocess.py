"""Volume preprocessing that the model contract prescribes: reorient, resample, normalise, cut into patches.

Numpy/scipy only, shared by the daemon (scoring) and the trainer (training and evaluation), so a model is
always fed exactly what it was trained on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qc_daemon.model_contract import Normalisation


class VolumeError(ValueError):
    """A volume cannot be preprocessed (wrong rank, empty, non-finite); the message says why."""


def resample_to_spacing(
    volume: np.ndarray, spacing_mm: tuple[float, float, float], target_mm: tuple[float, float, float]
) -> np.ndarray:
    """Linear resampling of a 3D array from ``spacing_mm`` to ``target_mm`` voxels (same field of view)."""
    if volume.ndim != 3:
        raise VolumeError(f"expected a 3D volume, got shape {volume.shape}")
    zoom = [s / t for s, t in zip(spacing_mm, target_mm, strict=True)]
    if all(abs(z - 1.0) < 1e-3 for z in zoom):
        return volume.astype(np.float32, copy=False)
    return ndimage.zoom(volume.astype(np.float32, copy=False), zoom, order=1, mode="nearest", grid_mode=True)


def resampled_shape(
    shape: tuple[int, ...], spacing_mm: tuple[float, float, float], target_mm: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The shape :func:`resample_to_spacing` gives a volume of ``shape`` (scipy's ``zoom`` rounding)."""
    zoom = [s / t for s, t in zip(spacing_mm, target_mm, strict=True)]
    if all(abs(z - 1.0) < 1e-3 for z in zoom):
        return tuple(int(n) for n in shape)
    return tuple(int(round(n * z)) for n, z in zip(shape, zoom, strict=True))


def model_grid_affine(
    affine: np.ndarray,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    target_mm: tuple[float, float, float],
    patch_size: int,
) -> np.ndarray:
    """The voxel-to-world affine of :func:`prepare_volume`'s output for a volume of ``shape`` with ``affine``.

    Resampling keeps the field of view (``grid_mode=True``): model voxel ``i`` has its centre at native voxel
    ``(i + 0.5) * n / m - 0.5`` (``n`` native, ``m`` resampled voxels); padding shifts it by the voxels added
    before the volume.
    """
    resampled = resampled_shape(shape, spacing_mm, target_mm)
    ratio = np.array([n / m for n, m in zip(shape, resampled, strict=True)], dtype=np.float64)
    pad_before = np.array([max(0, patch_size - m) // 2 for m in resampled], dtype=np.float64)
    model_to_native = np.eye(4)
    model_to_native[:3, :3] = np.diag(ratio)
    model_to_native[:3, 3] = 0.5 * ratio - 0.5 - pad_before * ratio
    return np.asarray(affine, dtype=np.float64) @ model_to_native


def normalise(volume: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """Map intensities to (0, 1] as :class:`~qc_daemon.model_contract.Normalisation` defines."""
    if not np.all(np.isfinite(volume)):
        raise VolumeError("volume holds NaN or infinite values")
    low_pct, high_pct = normalisation.clip_percentiles
    low, high = np.percentile(volume, [low_pct, high_pct])
    out = np.clip(volume.astype(np.float32, copy=False), low, high)
    span = float(high - low)
    if span <= 0.0:
        return np.full(volume.shape, normalisation.floor, dtype=np.float32)
    out = (out - np.float32(low)) / np.float32(span)
    return (np.float32(normalisation.floor) + np.float32(1.0 - normalisation.floor) * out).astype(np.float32)


def pad_to_min_size(volume: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Pad each axis shorter than ``size`` symmetrically with ``fill`` so at least one patch fits."""
    pads = []
    for extent in volume.shape:
        missing = max(0, size - extent)
        pads.append((missing // 2, missing - missing // 2))
    if not any(before or after for before, after in pads):
        return volume
    return np.pad(volume, pads, mode="constant", constant_values=fill)


def patch_origins(extent: int, size: int, step: int) -> list[int]:
    """Origins along one axis of patches of ``size`` every ``step`` voxels, the last one flush with the edge.

    Every voxel is covered: origins 0, step, 2*step, ... while they fit, then ``extent - size`` if the last
    regular patch stops short of the edge. ``extent`` must be >= ``size`` (pad first).
    """
    if extent < size:
        raise VolumeError(f"axis of {extent} voxels is shorter than the patch size {size}")
    if step <= 0:
        raise VolumeError(f"patch step must be positive, got {step}")
    origins = list(range(0, extent - size + 1, step))
    if origins[-1] + size < extent:
        origins.append(extent - size)
    return origins


def patch_grid(shape: tuple[int, int, int], size: int, step: int) -> list[tuple[int, int, int]]:
    """All 3D patch origins covering a volume of ``shape``, in C order."""
    xs, ys, zs = (patch_origins(extent, size, step) for extent in shape)
    return [(x, y, z) for x in xs for y in ys for z in zs]


def extract_patches(volume: np.ndarray, origins: list[tuple[int, int, int]], size: int) -> np.ndarray:
    """Stack the patches at ``origins`` as (N, 1, size, size, size) float32."""
    out = np.empty((len(origins), 1, size, size, size), dtype=np.float32)
    for i, (x, y, z) in enumerate(origins):
        out[i, 0] = volume[x : x + size, y : y + size, z : z + size]
    return out


def prepare_volume(
    volume: np.ndarray,
    spacing_mm: tuple[float, float, float],
    target_mm: tuple[float, float, float],
    normalisation: Normalisation,
    patch_size: int,
) -> np.ndarray:
    """Resample, normalise and pad a (RAS-oriented) volume: the array that patches are cut from."""
    return pad_to_min_size(model_grid_volume(volume, spacing_mm, target_mm, normalisation), patch_size,
                           fill=normalisation.floor)


def model_grid_volume(
    volume: np.ndarray,
    spacing_mm: tuple[float, float, float],
    target_mm: tuple[float, float, float],
    normalisation: Normalisation,
) -> np.ndarray:
    """Resample and normalise a (RAS-oriented) volume, not padded: the whole field of view, nothing added."""
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise VolumeError(f"expected a non-empty 3D volume, got shape {volume.shape}")
    return normalise(resample_to_spacing(volume, spacing_mm, target_mm), normalisation)
