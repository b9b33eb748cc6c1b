"""The quality map: per-patch scores spread back onto the model grid, its worst region, and its NIfTI file.

Each voxel of the map is the mean score of the patches that cover it (patches overlap by half at step 48, so
most voxels average 8 patches); 1 = best, like the score. The map lives on the model grid (the volume resampled
to the model's spacing and padded, ``Score.model_affine``), so it overlays the model input voxel for voxel and
any viewer places it on the scan through its affine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


class QualityMapError(ValueError):
    """Patch scores and origins that do not describe a map of the given shape; the message says why."""


def quality_map(
    shape: Sequence[int], origins: Sequence[Sequence[int]], patch_size: int, scores: Sequence[float]
) -> np.ndarray:
    """(X, Y, Z) float32 map: each voxel the mean score of the patches covering it, NaN where none does."""
    if len(origins) != len(scores):
        raise QualityMapError(f"{len(origins)} patch origins but {len(scores)} scores")
    shape = tuple(int(n) for n in shape)
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.int32)
    for (x, y, z), score in zip(origins, scores, strict=True):
        if min(x, y, z) < 0 or x + patch_size > shape[0] or y + patch_size > shape[1] or z + patch_size > shape[2]:
            raise QualityMapError(f"patch at {(x, y, z)} of size {patch_size} leaves the map of shape {shape}")
        total[x : x + patch_size, y : y + patch_size, z : z + patch_size] += score
        count[x : x + patch_size, y : y + patch_size, z : z + patch_size] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def worst_region(qmap: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """The centre of the lowest-scoring region of the map (within ``mask`` when it holds any mapped voxel).

    The map is constant over the cells where the same patches overlap; the centre is that of the voxels at the
    minimum, or the one of them nearest to it when the region is not convex.
    """
    valid = np.isfinite(qmap)
    if mask is not None and np.any(valid & mask):
        valid &= mask
    if not valid.any():
        raise QualityMapError("the map has no scored voxel")
    lowest = float(qmap[valid].min())
    at_min = valid & (qmap <= lowest + 1e-6)
    points = np.argwhere(at_min)
    centre = points.mean(axis=0)
    nearest = points[np.argmin(((points - centre) ** 2).sum(axis=1))]
    return tuple(int(i) for i in nearest)


def save_quality_map(qmap: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write the map as a gzipped float32 NIfTI with the model grid's affine, atomically; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.nan_to_num(qmap, nan=0.0).astype(np.float32), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"qc-daemon quality map, 1 = best"
    tmp = path.with_name(f".part-{os.getpid()}-{path.name}")
    nib.save(image, str(tmp))
    tmp.replace(path)
    return path
