"""Acquisition-realistic augmentation of a clean scan: what makes a good scan from another site look different.

With few training sites, a network can learn "these heads" (their contrast, field of view, background, slice
thickness) instead of what an artifact looks like, and then call any unfamiliar clean scan degraded. Before any
artifact, each training version of a clean scan is therefore "re-acquired" with a randomly drawn
:class:`Acquisition` (random half: :func:`draw_acquisition`, recorded as JSON; deterministic half:
:func:`acquire`):

* **contrast**: a random monotone intensity curve through the head's intensity percentiles (a generalisation of
  a gamma; tissue classes keep their T1 order, their ratios change: MPRAGE vs SPGR vs TFE vs spin echo,
  post-contrast scalp and fat), blended with the scan's own contrast (``curve_strength`` 0.25-1: a curve drawn
  at full strength can flatten grey/white contrast until blur cannot be told from anatomy, which no T1 does);
* **field of view**: sometimes air around the head (``margin``: the source scans are cut to their head box, but a
  scanner's field of view holds air on most sides, and that is where N/2 and motion ghosts show most), then random
  cropping of each side (tight FOVs, cut-off necks and vertices);
* **slice thickness**: sometimes (``p_thick``) a thick-slice acquisition along one axis (2.5-5 mm slices,
  slice profile averaged), as 2D clinical T1 series are;
* **background noise floor**: sometimes a Rician floor of 0.5-1.5 % of the 99th percentile, so skull-stripped
  scans with an exactly-zero background do not teach the network that "no noise" means "good".

The artifact is then applied on the re-acquired grid (``trainer.artifacts``) and the label is computed against
the re-acquired clean scan, so it stays exactly 1 for a clean version.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

CURVE_PERCENTILES: tuple[float, ...] = (0.0, 20.0, 40.0, 60.0, 80.0, 95.0, 99.5)
NO_MARGIN: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """How a clean scan is re-acquired (JSON-able via :meth:`to_dict`)."""

    crop: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))  # fraction cut from each side
    curve: tuple[float, ...] = ()  # output levels at CURVE_PERCENTILES of the head (empty: identity)
    thick_axis: int = -1  # -1: no thick slices
    thick_mm: float = 0.0
    floor_fraction: float = 0.0  # Rician noise floor sigma, fraction of p99
    floor_seed: int = 0
    curve_strength: float = 1.0  # weight of the random curve against the scan's own contrast
    margin: tuple[tuple[float, float], ...] = NO_MARGIN  # air added to each side, fraction of the extent

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, not tuples), as it reads back from a manifest; no margin is left out (as
        caches built before margins were drawn record it)."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        if self.margin == NO_MARGIN:
            del out["margin"]
        return out


IDENTITY = Acquisition()


def draw_acquisition(
    seed: int,
    spacing_mm: Sequence[float],
    p_thick: float = 0.25,
    p_curve: float = 0.85,
    p_floor: float = 0.4,
    min_curve_strength: float = 0.25,
    max_margin: float = 0.0,
    p_margin: float = 0.7,
) -> Acquisition:
    """The random half: a re-acquisition for a scan of voxel size ``spacing_mm``.

    ``max_margin`` > 0: on each axis with probability ``p_margin``, air of up to that fraction of the extent on
    each side (drawn from its own stream, so every other draw is the same as with no margin).
    """
    margin = NO_MARGIN
    if max_margin > 0:
        pad_rng = np.random.default_rng([seed, 1])
        margin = tuple(
            tuple(round(float(v), 3) for v in pad_rng.uniform(0, max_margin, size=2))
            if pad_rng.random() < p_margin
            else (0.0, 0.0)
            for _ in range(3)
        )
    rng = np.random.default_rng(seed)
    crop = tuple(
        (round(float(rng.uniform(0, 0.12)), 3), round(float(rng.uniform(0, 0.12)), 3)) if rng.random() < 0.5 else (0.0, 0.0)
        for _ in range(3)
    )
    curve: tuple[float, ...] = ()
    if rng.random() < p_curve:
        steps = rng.dirichlet(np.full(len(CURVE_PERCENTILES) - 1, 2.0))  # random monotone increments
        curve = tuple(round(float(v), 4) for v in np.concatenate([[0.0], np.cumsum(steps)]))
    thick_axis, thick_mm = -1, 0.0
    if rng.random() < p_thick:
        axis = int(rng.integers(0, 3))
        thickness = float(rng.uniform(2.5, 5.0))
        if thickness > 1.5 * float(spacing_mm[axis]):
            thick_axis, thick_mm = axis, round(thickness, 2)
    floor = round(float(rng.uniform(0.005, 0.015)), 4) if rng.random() < p_floor else 0.0
    floor_seed = int(rng.integers(0, 2**31 - 1))
    strength = round(float(rng.uniform(min_curve_strength, 1.0)), 3)
    return Acquisition(crop, curve, thick_axis, thick_mm, floor, floor_seed, strength, margin)


def acquire(
    volume: np.ndarray, spacing_mm: Sequence[float], acquisition: Acquisition
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The deterministic half: the re-acquired volume and its voxel size."""
    out = np.asarray(volume, dtype=np.float32)
    spacing = tuple(float(s) for s in spacing_mm)
    if acquisition.margin != NO_MARGIN:
        out = np.pad(out, [(int(round(n * a)), int(round(n * b))) for n, (a, b) in zip(out.shape, acquisition.margin)])
    out = _crop(out, acquisition.crop)
    if acquisition.curve:
        out = _intensity_curve(out, acquisition.curve, acquisition.curve_strength)
    if acquisition.thick_axis >= 0:
        out, spacing = _thick_slices(out, spacing, acquisition.thick_axis, acquisition.thick_mm)
    if acquisition.floor_fraction > 0:
        out = _noise_floor(out, acquisition.floor_fraction, acquisition.floor_seed)
    return out, spacing  # type: ignore[return-value]


def head_box(volume: np.ndarray, margin: int = 6) -> tuple[slice, slice, slice]:
    """The bounding box of everything above 5 % of the 99th percentile, plus ``margin`` voxels."""
    high = float(np.percentile(volume, 99))
    inside = volume > 0.05 * high
    if not inside.any():
        return (slice(None),) * 3  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(inside.any(axis=other))
        box.append(slice(max(0, hits[0] - margin), min(volume.shape[axis], hits[-1] + margin + 1)))
    return tuple(box)  # type: ignore[return-value]


def _crop(volume: np.ndarray, crop: Sequence[Sequence[float]]) -> np.ndarray:
    index = []
    for n, (before, after) in zip(volume.shape, crop, strict=True):
        start, stop = int(round(n * before)), n - int(round(n * after))
        index.append(slice(start, max(stop, start + 1)))
    return np.ascontiguousarray(volume[tuple(index)])


def _intensity_curve(volume: np.ndarray, curve: Sequence[float], strength: float = 1.0) -> np.ndarray:
    """Piecewise-linear monotone map through the head's intensity percentiles (0 stays 0), ``strength`` of the
    way from the scan's own levels to ``curve``."""
    top = float(np.percentile(volume, 99.5))
    head = volume[volume > 0.1 * top]
    if head.size == 0 or top <= 0:
        return volume
    knots = np.percentile(head, CURVE_PERCENTILES[1:-1])
    x = np.concatenate([[0.0], knots, [top]])
    x = np.maximum.accumulate(x + np.arange(x.size) * 1e-6 * top)  # strictly increasing
    y = strength * np.asarray(curve, dtype=np.float64) * top + (1.0 - strength) * x
    mapped = np.interp(volume, x, y)
    above = volume > top  # keep the bright tail's shape
    mapped[above] = y[-1] * volume[above] / top
    return mapped.astype(np.float32)


def _thick_slices(
    volume: np.ndarray, spacing: tuple[float, ...], axis: int, thickness_mm: float
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Average over a slice profile of ``thickness_mm`` along ``axis``, then sample one slice per thickness."""
    sigma = thickness_mm / 2.355 / spacing[axis]
    smoothed = ndimage.gaussian_filter1d(volume, sigma, axis=axis, truncate=2.5)
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = spacing[axis] / thickness_mm
    out = ndimage.zoom(smoothed, zoom, order=1, mode="nearest", grid_mode=True)
    new_spacing = list(spacing)
    new_spacing[axis] = spacing[axis] * volume.shape[axis] / out.shape[axis]
    return out.astype(np.float32), tuple(new_spacing)


def _noise_floor(volume: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    nonzero = volume[volume > 0]
    sigma = np.float32(fraction * (float(np.percentile(nonzero, 99)) if nonzero.size else 1.0))
    rng = np.random.default_rng(seed)
    real = volume + sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)
