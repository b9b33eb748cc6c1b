"""The N/2 ghost check: a direct measurement that floors the quality score where the network is known to be blind.

An N/2 (Nyquist) ghost is a copy of the head shifted by half the field of view along the phase-encode axis. The
network finds one that folds onto the head, but on scanners it was not trained on it misses one that lands in
the air above the vertex (MODEL_CARD.md, "N/2 ghosts by direction"): every training ghost was simulated on a
scan cut to its head, so it never saw a ghost in the air. This check measures the ghost where it lands, as
MRIQC's ghost-to-signal ratio does: for each voxel axis, the head mask shifted by half the extent, minus the
head and a 2-voxel rim, is where an N/2 ghost along that axis lies; its median intensity above the background,
over the head's mean above the background, is the ghost's fraction of the image. The largest over the axes is
the measured ghost (the phase-encode axis is not in the data the daemon gets).

The ratio is turned into a score on the trainer's own physical anchors for ghosts (trainer/configs: a 12 %
N/2 ghost is a scan to repeat and scores 0.3, a 7 % one is moderate and scores 0.65), through the ratio this
measurement reads for such ghosts on the model grid (the median over 8 heads of 6 sites, every axis); below
:data:`NO_EFFECT_BELOW` (2.5 times the largest ratio of 72 clean scans of six sites, 0.012) it changes nothing.
The series' score is the lower of the model's and this one's; both are stored. bench/bench_ghost_check.py makes
the measurements behind the knots (MODEL_CARD.md quotes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qc_daemon.iqms import IqmError, head_mask

AXIS_DIRECTIONS = ("left-right", "anterior-posterior", "superior-inferior")  # the voxel axes of a RAS+ volume
RIM_VOXELS = 2  # the head's edge (and a ghost that barely clears it) is left out of the ghost region
MIN_GHOST_VOXELS = 200  # less room than this between the head and the field of view's edge: not measurable
NO_EFFECT_BELOW = 0.03
# (measured ratio, score): piecewise linear, flat outside; the middle knots are the trainer's ghost anchors
RATIO_TO_SCORE: tuple[tuple[float, float], ...] = ((NO_EFFECT_BELOW, 1.0), (0.06, 0.65), (0.10, 0.3), (0.2, 0.0))


def axis_direction(axis: int | None) -> str | None:
    """The anatomical direction of a voxel axis of a RAS+ volume (None for None)."""
    return AXIS_DIRECTIONS[axis] if axis is not None else None


@dataclass(frozen=True)
class GhostMeasure:
    ratio: float | None  # the largest ghost-to-signal ratio over the axes; None when no axis can be measured
    axis: int | None  # the voxel axis of that ratio (0, 1, 2 of the RAS-oriented volume)
    reason: str | None = None  # why there is no ratio

    @property
    def direction(self) -> str | None:
        return axis_direction(self.axis)

    @property
    def score(self) -> float:
        """1 when there is no measurable ghost; lower as the ghost grows (:data:`RATIO_TO_SCORE`)."""
        if self.ratio is None:
            return 1.0
        ratios, scores = zip(*RATIO_TO_SCORE, strict=True)
        return float(np.interp(self.ratio, ratios, scores))


def measure_n2_ghost(volume: np.ndarray) -> GhostMeasure:
    """The N/2 ghost-to-signal ratio of a 3D volume, its largest over the three voxel axes.

    ``volume`` must cover the acquired field of view on each axis (resampled is fine, padded is not: the shift
    is half the array's extent)."""
    v = np.asarray(volume, dtype=np.float32)
    try:
        head = head_mask(v)
    except IqmError as exc:
        return GhostMeasure(None, None, f"no head mask: {exc}")
    near = ndimage.binary_dilation(head, iterations=RIM_VOXELS)
    head_mean = float(v[head].mean())
    best: tuple[float, int] | None = None
    for axis in range(3):
        region = np.roll(head, v.shape[axis] // 2, axis=axis) & ~near
        background = ~near & ~region
        if region.sum() < MIN_GHOST_VOXELS or background.sum() < MIN_GHOST_VOXELS:
            continue  # the head fills the field of view along this axis: its ghost would fold onto it
        floor = float(np.median(v[background]))
        if head_mean <= floor:
            continue
        ratio = (float(np.median(v[region])) - floor) / (head_mean - floor)
        if best is None or ratio > best[0]:
            best = (ratio, axis)
    if best is None:
        return GhostMeasure(None, None, "no room for an N/2 ghost beside the head on any axis")
    return GhostMeasure(round(best[0], 4), best[1])
